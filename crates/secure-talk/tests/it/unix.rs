//! The Unix-socket listener: the same endpoints in plain HTTP, its mode, stale socket files.

use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};

use secure_talk::config::Config;
use secure_talk::hub::Channel;
use secure_talk::server::Listeners;
use serde_json::json;

use crate::support::{TestServer, connect, create_pipe, data_until, expect_reply, http, send};

#[tokio::test]
async fn token_websockets_echo_and_pipes_over_the_unix_socket() {
    let server = TestServer::start().await;
    let socket = server.config.unix_socket.clone().expect("unix socket");
    let meta = std::fs::symlink_metadata(&socket).expect("socket file");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);

    let opts = server.unix("u");
    let mut data = connect(&opts, Channel::Data).await;
    let mut admin = connect(&opts, Channel::Admin).await;
    assert_eq!(
        admin.client_id, data.client_id,
        "one token file, one identity"
    );
    let (status, same) = http(&opts, "GET", "/", Some(&admin.token)).await;
    assert_eq!((status, same.as_str()), (200, admin.token.as_str()));

    let echo = r#"{"headers":{"method":"text"},"payload":"over unix"}"#;
    admin.send_text(echo).await.expect("send");
    let frame = admin.recv_frame().await.expect("recv").expect("frame");
    assert_eq!(frame.into_text().expect("text").as_str(), echo);

    let id = create_pipe(&mut admin, "echo unix").await;
    data_until(&mut data, id, "unix\n").await;
}

#[tokio::test]
async fn a_stale_socket_file_is_replaced_and_a_live_one_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("talk.sock");
    // A killed server leaves its socket file behind: bound, then closed without unlinking.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
    assert!(path.exists());
    let server = TestServer::start_in(dir, |c| c.unix_socket_mode = 0o600).await;
    assert_eq!(
        std::fs::metadata(&path)
            .expect("socket")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let mut admin = connect(&server.unix("u"), Channel::Admin).await;

    // A second server on the same paths must not steal them.
    let other = tempfile::tempdir().expect("tempdir");
    let mut config = Config::local(other.path());
    config.unix_socket = Some(path.clone());
    let err = Listeners::bind(&config)
        .await
        .expect_err("the socket is live");
    assert!(format!("{err:#}").contains("another process"), "{err:#}");
    let mut config = Config::local(other.path());
    config.ipc_socket = server.config.ipc_socket.clone();
    let err = Listeners::bind(&config)
        .await
        .expect_err("the ipc socket is live");
    assert!(format!("{err:#}").contains("another process"), "{err:#}");
    // Nor a path that is not a socket.
    let file = other.path().join("file");
    std::fs::write(&file, "x").expect("write");
    let mut config = Config::local(other.path());
    config.unix_socket = Some(file.clone());
    assert!(Listeners::bind(&config).await.is_err());
    assert_eq!(std::fs::read(&file).expect("still there"), b"x");

    // The first server still serves.
    send(&mut admin, json!({"headers": {"method": "nope"}})).await;
    expect_reply(&mut admin, 400, "unknown method").await;
}
