//! The files a scheduler takes: the Slurm array script, the Kubernetes Indexed Job, the
//! Containerfile of the image it runs. Every value is quoted (JSON strings are YAML strings;
//! shell words in single quotes).

use std::path::Path;

use super::Plan;

/// A shell word in single quotes.
fn sh(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// A YAML (JSON) string.
fn yaml(text: &str) -> String {
    serde_json::to_string(text).expect("a string serialises")
}

/// The `mtad sweep run` arguments after the binary (the index comes from the scheduler).
fn run_args(plan: &Plan, sweep: &Path) -> Vec<String> {
    let mut args = vec![
        "sweep".to_string(),
        "run".into(),
        "--sweep".into(),
        sweep.display().to_string(),
        "--device".into(),
        plan.cluster.device.clone(),
    ];
    if let Some(w) = &plan.cluster.teacher_weights {
        args.extend(["--teacher-weights".into(), w.display().to_string()]);
    }
    args
}

/// `slurm.sh`: one array index per task, at most `concurrency` at once, a GPU each where asked,
/// retried in place, requeued (and resumed from its checkpoint) when preempted.
pub fn slurm(plan: &Plan, sweep: &Path) -> String {
    let c = &plan.cluster;
    let n = plan.tasks.len();
    let mut s = String::new();
    s.push_str("#!/bin/bash\n");
    s.push_str(&format!(
        "# mtad sweep: {n} tasks ({} classes x {} students), one per array index.\n\
         # Submit: sbatch {}   Follow: mtad sweep status --sweep {}\n",
        plan.classes.len(),
        plan.students.len(),
        sweep.join("slurm.sh").display(),
        sweep.display()
    ));
    s.push_str("#SBATCH --job-name=mtad-sweep\n");
    s.push_str(&format!(
        "#SBATCH --array=0-{}%{}\n",
        n.saturating_sub(1),
        c.concurrency
    ));
    s.push_str(&format!(
        "#SBATCH --output={}\n",
        sweep.join("logs/slurm-%A_%a.out").display()
    ));
    s.push_str("#SBATCH --open-mode=append\n#SBATCH --requeue\n");
    if c.gpus > 0 {
        s.push_str(&format!("#SBATCH --gres=gpu:{}\n", c.gpus));
    }
    for option in &c.slurm_options {
        s.push_str(&format!("#SBATCH {option}\n"));
    }
    let command: Vec<String> = std::iter::once(c.mtad.display().to_string())
        .chain(run_args(plan, sweep))
        .map(|a| sh(&a))
        .collect();
    s.push_str(&format!(
        "\n# A task stopped by a signal (preemption, time limit) has written a checkpoint and \
         exits\n# 130 or 143: Slurm requeues it and it resumes. A failed task is retried {} \
         time(s).\nrc=1\nfor attempt in $(seq 1 {}); do\n  {}\n  rc=$?\n  case $rc in\n    \
         0|130|143) exit $rc ;;\n  esac\n  echo \"mtad sweep: task $SLURM_ARRAY_TASK_ID, \
         attempt $attempt failed (exit $rc)\" >&2\ndone\nexit $rc\n",
        c.retries,
        c.retries + 1,
        command.join(" ")
    ));
    s
}

/// `job.yaml`: a batch/v1 Indexed Job, one completion index per task.
pub fn job(plan: &Plan, sweep: &Path) -> String {
    let c = &plan.cluster;
    let n = plan.tasks.len();
    let command: Vec<String> = std::iter::once("mtad".to_string())
        .chain(run_args(plan, sweep))
        .map(|a| yaml(&a))
        .collect();
    let gpu = if c.gpus > 0 {
        format!(
            "          resources:\n            limits:\n              nvidia.com/gpu: {}\n",
            c.gpus
        )
    } else {
        String::new()
    };
    format!(
        "# mtad sweep: {n} tasks ({classes} classes x {students} students), one per completion \
         index.\n# The image: build {sweep}/Containerfile and push it as {image}. The claim \
         {claim} holds the\n# dataset and the sweep folder, mounted at {mount} (plan with the \
         paths the pods see).\n# Submit: kubectl apply -f job.yaml   Follow: kubectl get job \
         mtad-sweep; mtad sweep status\napiVersion: batch/v1\nkind: Job\nmetadata:\n  name: \
         mtad-sweep\n  labels:\n    app: mtad-sweep\nspec:\n  completionMode: Indexed\n  \
         completions: {n}\n  parallelism: {parallelism}\n  # Each index is retried on its own; \
         a failed index does not stop the others.\n  backoffLimitPerIndex: {retries}\n  \
         maxFailedIndexes: {n}\n  podFailurePolicy:\n    rules:\n      # Preempted or \
         evicted: not a failure; the index reruns and resumes from its checkpoint.\n      - \
         action: Ignore\n        onPodConditions:\n          - type: DisruptionTarget\n            status: \"True\"\n  \
         template:\n    metadata:\n      labels:\n        app: mtad-sweep\n    spec:\n      \
         restartPolicy: Never\n      # SIGTERM: mtad finishes its step and writes a \
         checkpoint.\n      terminationGracePeriodSeconds: 300\n      containers:\n        - \
         name: mtad\n          image: {image_q}\n          command: [{command}]\n{gpu}          \
         volumeMounts:\n            - name: sweep\n              mountPath: {mount_q}\n      \
         volumes:\n        - name: sweep\n          persistentVolumeClaim:\n            \
         claimName: {claim_q}\n",
        classes = plan.classes.len(),
        students = plan.students.len(),
        sweep = sweep.display(),
        image = c.image,
        claim = c.volume_claim,
        mount = c.mount.display(),
        parallelism = c.concurrency.min(n.max(1)),
        retries = c.retries,
        image_q = yaml(&c.image),
        command = command.join(", "),
        mount_q = yaml(&c.mount.display().to_string()),
        claim_q = yaml(&c.volume_claim),
    )
}

/// `Containerfile`: builds `mtad` with the plan's backend, the teachers' weights beside it.
pub fn containerfile(plan: &Plan) -> String {
    let backend = plan.cluster.backend.as_str();
    let (build_image, run_image, features, packages) = match backend {
        "cuda" => (
            "nvidia/cuda:12.6.3-devel-ubuntu24.04",
            "nvidia/cuda:12.6.3-runtime-ubuntu24.04",
            "--features cuda",
            "curl ca-certificates build-essential pkg-config",
        ),
        "wgpu" => (
            "debian:trixie",
            "debian:trixie-slim",
            "--features wgpu",
            "curl ca-certificates build-essential pkg-config",
        ),
        _ => (
            "debian:trixie",
            "debian:trixie-slim",
            "",
            "curl ca-certificates build-essential pkg-config",
        ),
    };
    let runtime = if backend == "wgpu" {
        "RUN apt-get update && apt-get install -y --no-install-recommends libvulkan1 \
         ca-certificates && rm -rf /var/lib/apt/lists/*\n"
    } else {
        ""
    };
    format!(
        "# The image of the sweep's Kubernetes Job: mtad built with the {backend} backend.\n\
         # Build it from the repository root, with the teachers exported into onnx/ first\n\
         # (python onnx/refresh_teachers.py; see the README's Teachers):\n\
         #   podman build -f <sweep>/Containerfile -t {image} . && podman push {image}\n\
         FROM {build_image} AS build\n\
         RUN apt-get update && apt-get install -y --no-install-recommends {packages} \
         && rm -rf /var/lib/apt/lists/*\n\
         RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal\n\
         ENV PATH=/root/.cargo/bin:$PATH\n\
         WORKDIR /src\n\
         COPY . .\n\
         RUN cargo build --release --locked {features} --bin mtad \\\n \
         && mkdir -p /opt/mtad/teachers \\\n \
         && cp target/release/build/multi-teacher-ad-*/out/generated/*.bpk /opt/mtad/teachers/\n\
         \n\
         FROM {run_image}\n\
         {runtime}\
         COPY --from=build /src/target/release/mtad /usr/local/bin/mtad\n\
         COPY --from=build /opt/mtad/teachers /opt/mtad/teachers\n\
         ENV MTAD_TEACHER_WEIGHTS=/opt/mtad/teachers\n\
         ENTRYPOINT []\n\
         CMD [\"mtad\", \"--help\"]\n",
        image = plan.cluster.image,
    )
}
