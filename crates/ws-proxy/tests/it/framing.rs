//! Attack pass F4: `ws-proxy-client connect` answered a HEAD with lengths a GET would not get
//! (two Content-Lengths, chunked, Transfer-Encoding with Content-Length). A HEAD's answer now
//! carries what a GET's framing gives: one valid Content-Length and no Transfer-Encoding, else
//! none, and a 502 where the GET is one.

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::{StatusCode, header};
use common::envelope::micronets::{NameValue, RestRequest, RestResponse};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use ws_proxy::client::front::to_http;
use ws_proxy::client::gateway::Gateway;

/// An upstream that answers `/PATH` with the canned head (and, to a GET, the body) of that
/// case, whatever the method, then closes.
async fn liar() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut chunk = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut chunk).await {
                        Ok(n @ 1..) => request.extend_from_slice(&chunk[..n]),
                        _ => return,
                    }
                }
                let text = String::from_utf8_lossy(&request);
                let get = text.starts_with("GET ");
                let path = text.split(' ').nth(1).unwrap_or("/").to_owned();
                let (head, body) = match path.as_str() {
                    "/two-cl" => ("Content-Length: 5\r\nContent-Length: 7\r\n", "1234567"),
                    "/same-cl" => ("Content-Length: 5\r\nContent-Length: 5\r\n", "12345"),
                    "/te-cl" => (
                        "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
                        "5\r\nhello\r\n0\r\n\r\n",
                    ),
                    "/chunked" => ("Transfer-Encoding: chunked\r\n", "5\r\nhello\r\n0\r\n\r\n"),
                    _ => ("Content-Length: 5\r\n", "hello"),
                };
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n{head}\r\n{}",
                    if get { body } else { "" }
                );
                let _ = tcp.write_all(answer.as_bytes()).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    addr
}

fn lengths(response: &RestResponse) -> Vec<String> {
    response
        .headers
        .iter()
        .flatten()
        .filter(|pair| pair.name.eq_ignore_ascii_case("content-length"))
        .map(|pair| pair.value.clone())
        .collect()
}

#[tokio::test]
async fn the_gateway_gives_a_head_the_length_a_get_would_have() {
    let upstream = liar().await;
    let (gateway, _out) = Gateway::new(
        &format!("http://{upstream}"),
        Duration::from_secs(5),
        1 << 20,
    )
    .unwrap();
    // (path, GET status, the HEAD's Content-Length values)
    let cases: [(&str, u16, &[&str]); 5] = [
        ("/plain", 200, &["5"]),
        ("/same-cl", 200, &["5"]),
        ("/two-cl", 502, &[]),
        ("/te-cl", 200, &[]),
        ("/chunked", 200, &[]),
    ];
    for (path, get_status, head_lengths) in cases {
        let get = gateway.perform(&RestRequest::new(1, "GET", path)).await;
        assert_eq!(get.status_code, get_status, "GET {path}");
        let head = gateway.perform(&RestRequest::new(2, "HEAD", path)).await;
        assert_eq!(head.status_code, get_status, "HEAD {path}: {head:?}");
        if get_status == 200 {
            assert_eq!(lengths(&head), head_lengths, "HEAD {path}: {head:?}");
        }
    }
}

#[tokio::test]
async fn the_front_end_keeps_only_one_valid_length_for_a_head() {
    let answer = |headers: &[(&str, &str)]| {
        let mut response = RestResponse::new(5, 4, 200);
        response.headers = Some(
            headers
                .iter()
                .map(|(name, value)| NameValue::new(*name, *value))
                .collect(),
        );
        let http = to_http(&response, true);
        assert_eq!(http.status(), StatusCode::OK);
        let lengths: Vec<String> = http
            .headers()
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        assert!(!http.headers().contains_key(header::TRANSFER_ENCODING));
        lengths
    };
    assert_eq!(answer(&[("Content-Length", "11")]), ["11"]);
    assert_eq!(
        answer(&[("Content-Length", "5"), ("content-length", "5")]),
        ["5"]
    );
    let none: [&str; 0] = [];
    assert_eq!(
        answer(&[("Content-Length", "5"), ("content-length", "7")]),
        none
    );
    assert_eq!(answer(&[("Content-Length", "5, 7")]), none);
    assert_eq!(answer(&[("Content-Length", "-5")]), none);
    assert_eq!(answer(&[("Content-Length", "99999999999999999999")]), none);
    assert_eq!(
        answer(&[("Transfer-Encoding", "chunked"), ("Content-Length", "3")]),
        none
    );
    assert_eq!(answer(&[("Transfer-Encoding", "chunked")]), none);
}
