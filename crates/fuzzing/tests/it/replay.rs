//! Every file in `fuzz/corpus/<target>/` (the seeds) and `fuzz/regressions/<target>/` (inputs
//! that found a bug) goes through its target's function, as the fuzzer would run it.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use fuzzing::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The files of `dir`, sorted; none when it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("a readable directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

/// Runs every kept input of `kind` (`corpus` or `regressions`); returns how many ran.
fn replay(kind: &str) -> usize {
    let mut failed = Vec::new();
    let mut ran = 0;
    for (name, target) in TARGETS {
        for path in files(&fuzz_dir().join(kind).join(name)) {
            let data = std::fs::read(&path).expect("a readable input");
            if catch_unwind(AssertUnwindSafe(|| target(&data))).is_err() {
                failed.push(path.display().to_string());
            }
            ran += 1;
        }
    }
    assert!(failed.is_empty(), "these inputs fail: {failed:#?}");
    ran
}

#[test]
fn every_target_has_seeds_and_a_fuzz_target() {
    let dir = fuzz_dir();
    for (name, _) in TARGETS {
        let seeds = files(&dir.join("corpus").join(name));
        assert!(!seeds.is_empty(), "fuzz/corpus/{name}/ has no seed");
        let size: u64 = seeds
            .iter()
            .map(|seed| seed.metadata().map_or(0, |m| m.len()))
            .sum();
        assert!(
            size <= 16 * 1024,
            "fuzz/corpus/{name}/ holds {size} bytes: keep a few seeds, not the generated corpus"
        );
        let source = dir.join("fuzz_targets").join(format!("{name}.rs"));
        let text = std::fs::read_to_string(&source)
            .unwrap_or_else(|err| panic!("{}: {err}", source.display()));
        assert!(
            text.contains(&format!("fuzzing::{name}(")),
            "{} does not call fuzzing::{name}",
            source.display()
        );
    }
}

#[test]
fn kept_inputs_belong_to_known_targets() {
    for kind in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz_dir().join(kind)) else {
            continue;
        };
        for entry in entries {
            let entry = entry.expect("a readable directory entry");
            let name = entry.file_name();
            assert!(
                TARGETS.iter().any(|(target, _)| name == *target),
                "fuzz/{kind}/{} is not a target",
                name.to_string_lossy()
            );
        }
    }
}

#[test]
fn seeds_replay() {
    assert!(replay("corpus") >= TARGETS.len());
}

#[test]
fn regressions_replay() {
    replay("regressions");
}
