//! signing-server's original protocol: the path a client writes after the handshake
//! (`signing_server::server::read_path`), then the file-name and line parsers it reaches
//! (`signing_server::fields`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use signing_server::fields::{self, Names};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::runtime::Runtime;

/// A small largest path, so inputs of a few KiB reach it.
const MAX_PATH: usize = 1024;

thread_local! {
    static RUNTIME: Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime builds");
}

/// A client's bytes, in writes of the size the first byte says, through the path reader;
/// then the path as a file name and as a signatures line.
pub fn signing_path(data: &[u8]) {
    let Some((&piece, bytes)) = data.split_first() else {
        return;
    };
    let mut client = Pieces {
        data: bytes,
        piece: usize::from(piece).max(1),
    };
    let read = RUNTIME
        .with(|runtime| runtime.block_on(signing_server::server::read_path(&mut client, MAX_PATH)));
    if let Ok(path) = &read {
        assert!(!path.is_empty() && path.len() <= MAX_PATH);
        assert!(bytes.starts_with(path.as_bytes()));
        assert!(!path.ends_with(['\n', '\r', '\0']));
        names(path);
    }
    if let Ok(text) = std::str::from_utf8(bytes) {
        names(text);
        if let Some(parsed) = fields::parse_line(text) {
            let line = fields::line(&parsed);
            assert!(fields::parse_line(&line).is_some(), "{line:?}");
        }
    }
}

fn names(name: &str) {
    let none = Names::default();
    let (_, fileset, _, _) = none.complete(name);
    assert!(name.is_empty() || !fileset.is_empty());
    let _ = none.invalid();
}

/// A reader that hands out `piece` bytes a read.
struct Pieces<'a> {
    data: &'a [u8],
    piece: usize,
}

impl AsyncRead for Pieces<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.piece.min(buf.remaining()).min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = tail;
        Poll::Ready(Ok(()))
    }
}
