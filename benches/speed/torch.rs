//! The PyTorch reference (`benches/reference/`): the interpreter, and `bench.py --serve` as one
//! warm process that times each case right after ours.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::Args;

pub(crate) fn python(args: &Args) -> String {
    args.python
        .clone()
        .or_else(|| std::env::var("MTAD_PYTHON").ok())
        .unwrap_or_else(|| "python3".into())
}

/// `benches/reference`: `$MTAD_REFERENCE_DIR` where set (a bench binary carried to another
/// machine, as `benches/gpu.sh` runs it), else this checkout's.
pub(crate) fn reference_dir() -> PathBuf {
    std::env::var_os("MTAD_REFERENCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/reference"))
}

/// Whether `python` can import torch and torchvision.
pub(crate) fn has_torch(python: &str) -> bool {
    Command::new(python)
        .args(["-c", "import torch, torchvision"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The PyTorch reference as one warm process (`bench.py --serve`): each case is timed when
/// asked, right after ours.
pub(crate) struct Reference {
    child: std::process::Child,
    input: Option<std::process::ChildStdin>,
    output: std::io::BufReader<std::process::ChildStdout>,
}

impl Reference {
    /// Starts `bench.py --serve` for `cases`, or says why it could not.
    pub(crate) fn start(args: &Args, cases: &[String]) -> Result<Self, String> {
        let mut child = Command::new(python(args))
            .arg(reference_dir().join("bench.py"))
            .args(["--serve", "--image-size", &args.image_size.to_string()])
            .args(["--iters", &args.iters.to_string()])
            .args(["--warmup", &args.warmup.to_string()])
            .args(["--device", &args.torch_device])
            .args(["--only", &cases.join(",")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("the PyTorch reference did not start: {e}"))?;
        let input = child.stdin.take();
        let output = std::io::BufReader::new(child.stdout.take().expect("piped"));
        Ok(Self {
            child,
            input,
            output,
        })
    }

    /// PyTorch's images/s for `case`, or why there is none.
    pub(crate) fn time(&mut self, case: &str) -> Result<f64, String> {
        use std::io::{BufRead, Write};
        let input = self.input.as_mut().expect("open until dropped");
        writeln!(input, "{case}")
            .and_then(|_| input.flush())
            .map_err(|e| format!("the PyTorch reference stopped: {e}"))?;
        let mut line = String::new();
        match self.output.read_line(&mut line) {
            Ok(0) | Err(_) => return Err("the PyTorch reference stopped".into()),
            Ok(_) => {}
        }
        let value: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| format!("the PyTorch reference answered {line:?}: {e}"))?;
        value["images_per_s"]
            .as_f64()
            .ok_or_else(|| format!("the PyTorch reference answered {}", line.trim()))
    }
}

impl Drop for Reference {
    fn drop(&mut self) {
        // Closing its stdin ends its loop.
        drop(self.input.take());
        let _ = self.child.wait();
    }
}
