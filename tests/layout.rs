//! The shape of the house, checked: the library does not print, no source file outside the
//! kernels crate grows past about 600 lines, the README stays a manual, and the method the
//! code cites is in the repository.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

#[test]
fn the_library_does_not_print() {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let binary = [
        root().join("src/main.rs"),
        root().join("src/cli.rs"),
        root().join("src/logging.rs"),
        root().join("src/detect_command.rs"),
        root().join("src/sweep_command.rs"),
    ];
    for file in files.iter().filter(|f| !binary.contains(f)) {
        let text = std::fs::read_to_string(file).unwrap();
        // Tests may print; the library's code may not.
        let code = text.split("#[cfg(test)]").next().unwrap();
        for macro_name in ["println!", "eprintln!", "print!(", "eprint!("] {
            assert!(
                !code.contains(macro_name),
                "{} uses {macro_name}: log with tracing or report progress instead",
                file.display()
            );
        }
    }
}

#[test]
fn no_file_outside_the_kernels_crate_is_over_about_600_lines() {
    let mut files = Vec::new();
    for dir in ["src", "tests", "benches"] {
        rust_files(&root().join(dir), &mut files);
    }
    files.push(root().join("build.rs"));
    for file in files {
        let lines = std::fs::read_to_string(&file).unwrap().lines().count();
        assert!(lines <= 620, "{} has {lines} lines", file.display());
    }
}

#[test]
fn the_readme_is_a_manual_and_the_method_is_in_the_repository() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(readme.lines().count() <= 300, "README.md is over 300 lines");
    assert!(readme.contains("docs/METHOD.md"));
    assert!(!readme.contains("shared/METHOD.md"));
    assert!(root().join("docs/METHOD.md").is_file());
    assert!(root().join("docs/PERFORMANCE.md").is_file());
}
