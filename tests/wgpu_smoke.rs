//! The wgpu backend runs a teacher and agrees with the CPU backend (training, scoring and the
//! commands on wgpu: tests/gpu_backend.rs). In CI it runs on Mesa's
//! software Vulkan (lavapipe); `MTAD_REQUIRE_WGPU=1` makes a missing adapter a failure there.
#![cfg(feature = "wgpu")]

mod common;

use burn::prelude::*;
use burn::tensor::Distribution;
use multi_teacher_ad::{
    device::wgpu_kind,
    teachers::{Teacher, TeacherFamily, TeacherId, TeacherSize, WeightsLocation},
};

#[test]
fn tiny_teachers_on_wgpu_match_the_cpu() {
    let wgpu = match wgpu_kind(DeviceKind::Cpu).or_else(|_| wgpu_kind(DeviceKind::DefaultDevice)) {
        Ok(selected) => selected.device,
        Err(e) if std::env::var_os("MTAD_REQUIRE_WGPU").is_none() => {
            eprintln!("skipped: no wgpu adapter ({e}); set MTAD_REQUIRE_WGPU=1 to fail instead");
            return;
        }
        Err(e) => panic!("MTAD_REQUIRE_WGPU is set but wgpu cannot start: {e}"),
    };
    // Asking again in the same process reaches the runtime already started.
    let again = wgpu_kind(DeviceKind::Cpu)
        .or_else(|_| wgpu_kind(DeviceKind::DefaultDevice))
        .expect("a second request for the same adapter");
    let sum = Tensor::<1>::from_floats([1.0, 2.0], &again.device)
        .sum()
        .into_scalar::<f32>();
    assert_eq!(sum, 3.0);
    let cpu = Device::flex();
    cpu.seed(7);
    let input = Tensor::<4>::random([2, 3, 40, 40], Distribution::Uniform(-1.0, 1.0), &cpu);
    let values = input.clone().into_data();
    for family in TeacherFamily::ALL {
        let id = TeacherId::new(family, TeacherSize::Tiny);
        let on_cpu = Teacher::load(id, &WeightsLocation::Build, &cpu).unwrap();
        let on_gpu = Teacher::load(id, &WeightsLocation::Build, &wgpu).unwrap();
        let want = on_cpu
            .forward(input.clone())
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        let got = on_gpu
            .forward(Tensor::<4>::from_data(values.clone(), &wgpu))
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        let error = common::relative_l2(&got, &want);
        println!("{id} on wgpu vs cpu: relative L2 {error:.2e}");
        assert!(error <= 1e-4, "{id}: relative L2 {error}");
    }
}
