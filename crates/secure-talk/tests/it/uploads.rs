//! `model` uploads: where files land, what is refused, the checksum broadcast and push.

use common::envelope::talk::{BinaryMessage, Headers, md5_hex, method};
use secure_talk::client::Incoming;
use secure_talk::hub::Channel;
use serde_json::{Value, json};

use crate::support::{STEP, TestServer, connect, expect_reply, recv_method};

fn model(path: &str, bytes: &[u8]) -> BinaryMessage {
    BinaryMessage::new(
        Headers::method(method::MODEL).with_path(path),
        bytes.to_vec(),
    )
}

/// Every file under `dir`, relative, sorted.
fn files(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(dir).expect("below").display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn an_upload_is_written_recorded_and_broadcast() {
    let server = TestServer::start().await;
    let mut a = connect(&server.alice("a"), Channel::Admin).await;
    let mut b = connect(&server.bob("b"), Channel::Admin).await;
    let bytes: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let sum = md5_hex(&bytes);

    a.send_binary(&model("m1/w.bin", &bytes))
        .await
        .expect("send");
    expect_reply(&mut a, 200, "m1/w.bin").await;
    let upload_dir = &server.config.upload_dir;
    assert_eq!(
        std::fs::read(upload_dir.join("m1/w.bin")).expect("uploaded"),
        bytes
    );
    let info: Value = serde_json::from_slice(
        &std::fs::read(upload_dir.join("model_info.json")).expect("model_info.json"),
    )
    .expect("json");
    assert_eq!(info, json!({"m1/w.bin": sum}));
    assert_eq!(files(upload_dir), ["m1/w.bin", "model_info.json"]);
    // Every admin connection hears about it.
    for conn in [&mut a, &mut b] {
        let broadcast = recv_method(conn, method::CHECK_SUM).await;
        let text = broadcast
            .payload
            .as_ref()
            .and_then(Value::as_str)
            .expect("text");
        let broadcast: Value = serde_json::from_str(text).expect("json");
        assert_eq!(broadcast, info);
    }

    // A new admin connection gets model_info.json pushed as a binary checkSum message.
    let mut c = connect(&server.alice("c"), Channel::Admin).await;
    let push = c.recv_timeout(STEP).await.expect("recv").expect("a push");
    let Incoming::Binary(push) = push else {
        panic!("expected a binary push, got {push:?}");
    };
    assert_eq!(push.headers.method.as_deref(), Some(method::CHECK_SUM));
    assert_eq!(push.headers.path.as_deref(), Some("model_info.json"));
    assert!(push.checksum_ok());
    assert_eq!(
        push.payload.as_ref(),
        std::fs::read(upload_dir.join("model_info.json")).expect("read")
    );
    // A second upload updates the record.
    c.send_binary(&model("w2.bin", b"second"))
        .await
        .expect("send");
    expect_reply(&mut c, 200, "w2.bin").await;
    let info: Value = serde_json::from_slice(
        &std::fs::read(upload_dir.join("model_info.json")).expect("model_info.json"),
    )
    .expect("json");
    assert_eq!(info["w2.bin"], json!(md5_hex(b"second")));
    assert_eq!(info["m1/w.bin"], json!(sum));
}

#[tokio::test]
async fn traversal_bad_checksums_and_missing_paths_are_refused() {
    let server = TestServer::start().await;
    let mut a = connect(&server.alice("a"), Channel::Admin).await;
    // Names unique to this run, so leftovers elsewhere cannot matter.
    let tag = server
        .dir
        .path()
        .file_name()
        .expect("a name")
        .to_string_lossy()
        .into_owned();
    let escapes = [
        format!("../{tag}-evil"),
        format!("a/../../{tag}-x"),
        format!("../../{tag}-evil2"),
    ];
    let names = [
        "/etc/x",
        "..",
        ".hidden",
        "a/.git/config",
        "model_info.json",
        // As a directory it would stand where model_info.json belongs, for every client.
        "model_info.json/x.bin",
        "./model_info.json/a/b",
        "a\\..\\x",
        "",
    ];
    for name in escapes.iter().map(String::as_str).chain(names) {
        a.send_binary(&model(name, b"payload")).await.expect("send");
        expect_reply(&mut a, 400, "refused").await;
    }
    a.send_binary(&BinaryMessage::new(
        Headers::method(method::MODEL),
        b"x".to_vec(),
    ))
    .await
    .expect("send");
    expect_reply(&mut a, 400, "path is required").await;
    // A checksum that is not the payload's.
    let mut wrong = model("m2/x.bin", b"payload");
    wrong.check_sum = md5_hex(b"something else");
    a.send_binary(&wrong).await.expect("send");
    expect_reply(&mut a, 422, "checksum").await;

    assert!(!server.config.upload_dir.join("model_info.json").exists());
    assert!(
        files(&server.config.upload_dir).is_empty(),
        "{:?}",
        files(&server.config.upload_dir)
    );
    // Nothing landed where the escapes point (the state directory and its parent).
    let outside = server.dir.path();
    for base in [outside, outside.parent().expect("parent")] {
        let stray: Vec<_> = std::fs::read_dir(base)
            .expect("read_dir")
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{tag}-"))
            })
            .collect();
        assert!(stray.is_empty(), "{stray:?}");
    }
    assert!(!std::path::Path::new("/etc/x").exists());
    // No model_info.json yet: nothing is pushed on connect, and the channel works.
    let mut c = connect(&server.alice("c"), Channel::Admin).await;
    c.send_text(r#"{"headers":{"method":"nope"}}"#)
        .await
        .expect("send");
    let first = c.recv_timeout(STEP).await.expect("recv").expect("a reply");
    assert!(
        matches!(&first, Incoming::Message(m) if m.headers.code == Some(400)),
        "{first:?}"
    );
}

#[tokio::test]
async fn a_symlink_inside_the_upload_directory_creates_nothing_outside() {
    let server = TestServer::start().await;
    let upload_dir = &server.config.upload_dir;
    let outside = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(upload_dir).expect("the upload directory");
    std::os::unix::fs::symlink(outside.path(), upload_dir.join("link")).expect("symlink");
    std::fs::write(upload_dir.join("plain"), b"a file").expect("write");
    let mut a = connect(&server.alice("a"), Channel::Admin).await;
    for name in ["link/new/file", "link/file", "plain/new/file"] {
        a.send_binary(&model(name, b"payload")).await.expect("send");
        expect_reply(&mut a, 400, "leaves the upload directory").await;
    }
    // Nothing was created through the link, not even a directory.
    let created: Vec<_> = std::fs::read_dir(outside.path())
        .expect("read_dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(created.is_empty(), "{created:?}");
    assert_eq!(files(upload_dir), ["plain"]);
    // The same names without the link work.
    a.send_binary(&model("real/new/file", b"payload"))
        .await
        .expect("send");
    expect_reply(&mut a, 200, "real/new/file").await;
}

/// A tree migrated from the original: its `model_info.json` has the original's nested shape.
/// An upload is recorded in that shape (never a mix), the broadcast carries it, and a name
/// that shape cannot record is refused before anything is written.
#[tokio::test]
async fn the_originals_nested_model_info_keeps_its_shape() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upload_dir = dir.path().join("uploads");
    std::fs::create_dir_all(upload_dir.join("yolov1tiny")).expect("mkdir");
    let old_md5 = md5_hex(b"old xml");
    std::fs::write(upload_dir.join("yolov1tiny/yolov1tiny.xml"), b"old xml").expect("model");
    let original =
        json!({"yolov1tiny": {"model_file": {"yolov1tiny.xml": old_md5}, "has_model": "Yes"}});
    std::fs::write(upload_dir.join("model_info.json"), original.to_string()).expect("info");
    let server = TestServer::start_in(dir, |_| {}).await;
    let mut a = connect(&server.alice("a"), Channel::Admin).await;
    // The connect-time push is the file as it is.
    let push = a.recv_timeout(STEP).await.expect("recv").expect("a push");
    let Incoming::Binary(push) = push else {
        panic!("expected a binary push, got {push:?}");
    };
    assert_eq!(push.headers.method.as_deref(), Some(method::CHECK_SUM));
    assert_eq!(
        serde_json::from_slice::<Value>(&push.payload).expect("json"),
        original
    );

    let bytes = b"new weights".to_vec();
    let sum = md5_hex(&bytes);
    a.send_binary(&model("yolov1tiny/yolov1tiny.bin", &bytes))
        .await
        .expect("send");
    expect_reply(&mut a, 200, "yolov1tiny/yolov1tiny.bin").await;
    let expected = json!({"yolov1tiny": {
        "model_file": {"yolov1tiny.xml": old_md5, "yolov1tiny.bin": sum},
        "has_model": "Yes"
    }});
    let text = std::fs::read_to_string(upload_dir.join("model_info.json")).expect("info");
    assert_eq!(
        serde_json::from_str::<Value>(&text).expect("json"),
        expected
    );
    assert!(
        !text.contains('\n'),
        "written compact, as the original does: {text}"
    );
    let broadcast = recv_method(&mut a, method::CHECK_SUM).await;
    let payload = broadcast
        .payload
        .as_ref()
        .and_then(Value::as_str)
        .expect("text");
    assert_eq!(
        serde_json::from_str::<Value>(payload).expect("json"),
        expected
    );

    // A second model joins in the same shape.
    a.send_binary(&model("lprnet/lprnet.xml", b"lpr"))
        .await
        .expect("send");
    expect_reply(&mut a, 200, "lprnet/lprnet.xml").await;
    let info: Value =
        serde_json::from_slice(&std::fs::read(upload_dir.join("model_info.json")).expect("info"))
            .expect("json");
    assert_eq!(
        info["lprnet"],
        json!({"model_file": {"lprnet.xml": md5_hex(b"lpr")}, "has_model": "Yes"})
    );

    // A name without a model directory cannot be recorded in that shape: refused, nothing
    // written, the file unchanged.
    a.send_binary(&model("top.bin", b"top"))
        .await
        .expect("send");
    expect_reply(&mut a, 400, "MODEL/FILE").await;
    assert!(!upload_dir.join("top.bin").exists());
    let after: Value =
        serde_json::from_slice(&std::fs::read(upload_dir.join("model_info.json")).expect("info"))
            .expect("json");
    assert_eq!(after, info);
}

/// A `model_info.json` that is neither shape is never rewritten into a mix.
#[tokio::test]
async fn a_mixed_model_info_is_not_rewritten() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upload_dir = dir.path().join("uploads");
    std::fs::create_dir_all(&upload_dir).expect("mkdir");
    let mixed = json!({"a.bin": md5_hex(b"a"), "m": {"model_file": {}, "has_model": "No"}});
    std::fs::write(upload_dir.join("model_info.json"), mixed.to_string()).expect("info");
    let server = TestServer::start_in(dir, |_| {}).await;
    let mut a = connect(&server.alice("a"), Channel::Admin).await;
    a.send_binary(&model("m/x.bin", b"x")).await.expect("send");
    expect_reply(&mut a, 400, "neither").await;
    assert!(!upload_dir.join("m/x.bin").exists());
    assert_eq!(
        std::fs::read_to_string(upload_dir.join("model_info.json")).expect("info"),
        mixed.to_string()
    );
}

/// The first thing an admin connection receives after an echo request: the echo, not a push.
async fn echo_comes_first(conn: &mut secure_talk::client::Connection) {
    conn.send_text(r#"{"headers":{"method":"text"},"payload":"ping"}"#)
        .await
        .expect("send");
    let first = conn
        .recv_timeout(STEP)
        .await
        .expect("the connection answers in time")
        .expect("a message");
    let Incoming::Message(echo) = first else {
        panic!("expected the echo, got {first:?}");
    };
    assert_eq!(echo.method(), method::TEXT);
    assert_eq!(echo.payload, Some(json!("ping")));
}

/// A FIFO planted at `model_info.json` (by anyone who can write the upload directory) is
/// never opened to be read and waited on: admin connections get no push and carry on, an
/// upload is refused with 500 before anything is moved in, and the FIFO is left as it is.
/// (The connect-time push and the upload's update blocked on it for ever, a blocking thread
/// each.)
#[tokio::test]
async fn a_fifo_at_model_info_json_blocks_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upload_dir = dir.path().join("uploads");
    std::fs::create_dir_all(&upload_dir).expect("mkdir");
    let info = upload_dir.join("model_info.json");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &info,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .expect("mkfifo");
    let server = TestServer::start_in(dir, |_| {}).await;
    let mut conns = Vec::new();
    for i in 0..4 {
        let mut a = connect(&server.alice(&format!("a{i}")), Channel::Admin).await;
        echo_comes_first(&mut a).await;
        conns.push(a);
    }
    let a = &mut conns[0];
    a.send_binary(&model("m/x.bin", b"x")).await.expect("send");
    expect_reply(a, 500, "model_info.json is not a regular file").await;
    assert!(!upload_dir.join("m").exists());
    let kind = std::fs::symlink_metadata(&info)
        .expect("still there")
        .file_type();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&kind));
    // Once the operator removes it, uploads work again.
    std::fs::remove_file(&info).expect("remove");
    a.send_binary(&model("m/x.bin", b"x")).await.expect("send");
    expect_reply(a, 200, "m/x.bin").await;
}

/// A symlink at `model_info.json` is never followed: its target (a file outside, or one
/// inside the upload directory) is not pushed to controllers, an upload is refused with 500
/// and the link and its target are left as they are. (The target was read through and pushed
/// to every admin connection.)
#[tokio::test]
async fn a_symlink_at_model_info_json_is_not_followed() {
    let outside = tempfile::tempdir().expect("tempdir");
    let secret = outside.path().join("secret.json");
    let secret_text = r#"{"SECRET/key": "hunter2"}"#;
    std::fs::write(&secret, secret_text).expect("write");
    for target in [secret.clone(), std::path::PathBuf::from("inside.json")] {
        let dir = tempfile::tempdir().expect("tempdir");
        let upload_dir = dir.path().join("uploads");
        std::fs::create_dir_all(&upload_dir).expect("mkdir");
        std::fs::write(upload_dir.join("inside.json"), secret_text).expect("write");
        let info = upload_dir.join("model_info.json");
        std::os::unix::fs::symlink(&target, &info).expect("symlink");
        let server = TestServer::start_in(dir, |_| {}).await;
        let mut a = connect(&server.alice("a"), Channel::Admin).await;
        echo_comes_first(&mut a).await;
        a.send_binary(&model("m/x.bin", b"x")).await.expect("send");
        expect_reply(&mut a, 500, "model_info.json is a symlink").await;
        assert!(!upload_dir.join("m").exists(), "{target:?}");
        assert_eq!(std::fs::read_link(&info).expect("still a link"), target);
        assert_eq!(std::fs::read_to_string(&secret).expect("read"), secret_text);
    }
}

/// `model_info.json` has a byte bound, `max_model_info_bytes`: an upload that would take it
/// past it is refused with 413 before anything is moved in and the file is unchanged; a file
/// already larger is neither pushed nor rewritten. (It grew without bound, and every admin
/// connection was sent a copy of it after each upload.)
#[tokio::test]
async fn model_info_json_is_bounded_in_bytes() {
    const MAX: usize = 4096;
    let dir = tempfile::tempdir().expect("tempdir");
    let upload_dir = dir.path().join("uploads");
    std::fs::create_dir_all(&upload_dir).expect("mkdir");
    let info = upload_dir.join("model_info.json");
    let server = TestServer::start_in(dir, |c| c.limits.max_model_info_bytes = MAX).await;
    assert_eq!(
        secure_talk::config::Limits::default().max_model_info_bytes,
        1 << 20
    );
    let mut a = connect(&server.alice("a"), Channel::Admin).await;
    // Long names fill it up to the bound, then the next one is refused.
    let mut accepted = 0;
    let refused = loop {
        let name = format!("m{accepted:03}/{}.bin", "n".repeat(200));
        a.send_binary(&model(&name, b"x")).await.expect("send");
        let reply = recv_method(&mut a, method::TEXT).await;
        if reply.headers.code == Some(200) {
            accepted += 1;
            assert!(accepted < 100, "never refused");
            continue;
        }
        break (reply, name);
    };
    let (reply, name) = refused;
    assert_eq!(reply.headers.code, Some(413), "{reply:?}");
    let text = reply
        .payload
        .as_ref()
        .and_then(Value::as_str)
        .expect("text");
    assert!(text.contains("max_model_info_bytes (4096 bytes)"), "{text}");
    let before = std::fs::read(&info).expect("info");
    assert!(
        before.len() <= MAX && before.len() > MAX - 300,
        "{}",
        before.len()
    );
    assert!(
        !upload_dir
            .join(name.split('/').next().expect("dir"))
            .exists()
    );
    let recorded: Value = serde_json::from_slice(&before).expect("json");
    assert_eq!(
        recorded.as_object().map(serde_json::Map::len),
        Some(accepted)
    );
    // A file already past the bound (the operator's) is not pushed, and not rewritten.
    let big = json!({"big.bin": "x".repeat(MAX)}).to_string();
    std::fs::write(&info, &big).expect("write");
    let mut b = connect(&server.alice("b"), Channel::Admin).await;
    echo_comes_first(&mut b).await;
    b.send_binary(&model("s.bin", b"x")).await.expect("send");
    expect_reply(&mut b, 413, "max_model_info_bytes").await;
    assert_eq!(std::fs::read_to_string(&info).expect("info"), big);
}
