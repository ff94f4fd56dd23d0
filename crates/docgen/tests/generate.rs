//! The generator writes a man page and bash, zsh and fish completions for every packaged
//! binary, each naming the binary (the paths the crates' `[package.metadata.deb]` assets use).

use std::fs;

#[test]
fn every_binary_gets_a_man_page_and_three_completions() {
    let out = tempfile::tempdir().unwrap();
    let count = docgen::generate(out.path()).unwrap();
    let names: Vec<&str> = docgen::binaries().iter().map(|(name, _)| *name).collect();
    assert_eq!(count, names.len());
    for name in names {
        let page = fs::read_to_string(out.path().join("man").join(format!("{name}.1"))).unwrap();
        assert!(page.starts_with(".ie"), "{name}.1 is not roff: {page:.80}");
        assert!(
            page.contains(&format!(".TH {name} 1")),
            "{name}.1 has no title line"
        );
        for shell in ["bash", "zsh", "fish"] {
            let path = docgen::completion_path(out.path(), shell, name);
            let script = fs::read_to_string(&path).unwrap();
            assert!(
                script.contains(name),
                "{} does not name {name}",
                path.display()
            );
        }
    }
}

#[test]
fn every_packaged_binary_is_listed() {
    // The binaries of the packages (not the benchmarks): a new one needs its man page.
    let mut names: Vec<&str> = docgen::binaries().iter().map(|(name, _)| *name).collect();
    names.sort_unstable();
    let mut assets = Vec::new();
    for krate in [
        "broker",
        "certgen",
        "remo-serv",
        "secure-talk",
        "signing-server",
        "ws-proxy",
    ] {
        let manifest = fs::read_to_string(format!(
            "{}/../{krate}/Cargo.toml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        for line in manifest.lines() {
            if let Some(rest) = line.trim().strip_prefix("[\"target/release/") {
                assets.push(rest.split('"').next().unwrap().to_owned());
            }
        }
    }
    assets.sort_unstable();
    assert_eq!(names, assets);
}
