//! The external signer: a stand-in `create_pkgsign` that writes the signature line to its
//! output file, fails, names another key, or hangs, depending on the file name.

use std::path::Path;
use std::time::{Duration, Instant};

use signing_server::config::{ClientRule, Limits};

use crate::support::{
    Answer, Options, TestServer, command_key, full, sha256_hex, test_limits, write_script,
};

/// A `create_pkgsign` stand-in called as `create_pkgsign -a infile=FILE OUTPUT`. A file name
/// containing `fail` makes it exit 1, `otherkey` sign with another key, `slow` hang (its
/// `sleep` child's pid goes to `pids/`), anything else succeed with a colon-laden timestamp.
fn script(pids: &Path) -> String {
    format!(
        r#"#!/bin/sh
[ "$1" = "-a" ] || {{ echo "usage: create_pkgsign -a infile=FILE OUTPUT" >&2; exit 2; }}
file="${{2#infile=}}"
out="$3"
keyid=aixkey
case "${{file##*/}}" in
  *fail*) echo "create_pkgsign: cannot sign $file" >&2; exit 1 ;;
  *otherkey*) keyid=otherkey ;;
  *slow*) sleep 30 & echo $! > "{pids}/sleep.pid"; echo $$ > "{pids}/sh.pid"; wait ;;
esac
printf '#package:fileset:vrmf:ftype:keyid:timestamp:signature\nbos:bos.rte:7.3.0.0:S:%s:2023-03-10 18:15:04:c2lnbmF0dXJl\n' "$keyid" > "$out"
"#,
        pids = pids.display()
    )
}

/// Whether process `pid` is gone (or a zombie waiting to be reaped).
fn gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test]
async fn a_create_pkgsign_compatible_command_signs_fails_and_times_out() {
    let work = tempfile::tempdir().unwrap();
    let program = work.path().join("create_pkgsign");
    let pids = work.path().join("pids");
    let root = work.path().join("aix");
    std::fs::create_dir(&pids).unwrap();
    std::fs::create_dir(&root).unwrap();
    write_script(&program, &script(&pids));
    let server = TestServer::start(Options {
        limits: Limits {
            command_timeout_secs: 1,
            ..test_limits()
        },
        keys: vec![command_key(program)],
        clients: vec![ClientRule {
            cn: "alice".into(),
            key: "aix".into(),
            roots: vec![root.clone()],
        }],
        ..Options::default()
    })
    .await;
    for name in [
        "bos.rte.7.3.0.0.bff",
        "fail.bin",
        "otherkey.bin",
        "slow.bin",
    ] {
        std::fs::write(root.join(name), name.as_bytes()).unwrap();
    }

    let started = Instant::now();
    let answer = Answer::parse(&server.alice_legacy(root.to_str().unwrap()).await);
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    let files = answer.files();
    let ok = &files["bos.rte.7.3.0.0.bff"];
    for (field, value) in [
        ("package", "bos"),
        ("fileset", "bos.rte"),
        ("vrmf", "7.3.0.0"),
        ("ftype", "S"),
        ("keyid", "aixkey"),
        ("timestamp", "2023-03-10 18:15:04"),
        ("signature", "c2lnbmF0dXJl"),
    ] {
        assert_eq!(ok[field], value, "{field}: {ok}");
    }
    let error = |name: &str| {
        files[name]["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: {files}"))
            .to_owned()
    };
    assert!(error("fail.bin").contains("cannot sign"), "{files}");
    assert!(error("otherkey.bin").contains("otherkey"), "{files}");
    assert!(error("slow.bin").contains("within 1 s"), "{files}");

    // The hung signer is killed, its children too.
    for pid_file in ["sh.pid", "sleep.pid"] {
        let pid = std::fs::read_to_string(pids.join(pid_file)).unwrap();
        let pid = pid.trim();
        let what = format!("{pid_file} ({pid}) to end");
        testkit::until(&what, Duration::from_secs(3), || gone(pid)).await;
    }

    let rows = server.service.audit.rows().await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].3, sha256_hex(b"bos.rte.7.3.0.0.bff"));
    assert_eq!(rows[0].4, "aixkey");

    // An upload through the command, with the client's fields winning.
    let reply = server
        .alice(
            "POST",
            "/v1/sign?name=tool.bin&vrmf=9.9.9.9",
            full(&b"tool"[..]),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let signed = reply.json();
    assert_eq!(signed["vrmf"], "9.9.9.9");
    assert_eq!(signed["fileset"], "bos.rte");
    assert_eq!(signed["timestamp"], "2023-03-10 18:15:04");
    assert_eq!(signed["sha256"], sha256_hex(b"tool"));
}
