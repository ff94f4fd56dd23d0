//! Encrypting a file as a sequence of tokens on several threads.
//!
//! Fernet's AES-CBC encryption is serial within a token but tokens are independent, so each
//! worker reads its own pieces with positioned reads and encrypts them; the caller receives
//! the lines in token order. Memory stays bounded: each worker has a small queue.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::sync::mpsc::sync_channel;

use crate::proto::Cipher;

/// Runs of tokens each worker may have ready ahead of the caller.
const AHEAD: usize = 2;
/// Consecutive tokens a worker encrypts per run.
const GROUP: u64 = 8;

/// How a file is cut into tokens: `count` tokens, token `t` holding bytes
/// `[t·piece, min(size, (t+1)·piece))`.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// File size the transfer announces.
    pub size: u64,
    /// Plaintext bytes per token.
    pub piece: usize,
    /// Number of tokens.
    pub count: u64,
}

/// Encrypts the tokens of `layout`, with `plain(t, payload)` building token `t`'s plaintext. `emit` receives each
/// token (without line break) in order and returns `false` to stop early.
///
/// # Errors
/// A read error, or a file shorter than `size` (it changed during the transfer).
pub fn encrypt_pieces<P, E>(
    file: &File,
    layout: Layout,
    workers: usize,
    cipher: &Cipher,
    plain: P,
    mut emit: E,
) -> io::Result<()>
where
    P: Fn(u64, &[u8]) -> Vec<u8> + Sync,
    E: FnMut(String) -> bool,
{
    let Layout { size, piece, count } = layout;
    let workers = workers.clamp(1, 8) as u64;
    let piece64 = piece as u64;
    // Workers take runs of GROUP consecutive tokens in turn: one hand-off per run, not per
    // token (the thread wake-ups showed in the profiles).
    let groups = count.div_ceil(GROUP);
    std::thread::scope(|scope| {
        let mut queues = Vec::new();
        for first in 0..workers {
            let (tx, rx) = sync_channel::<io::Result<Vec<String>>>(AHEAD);
            queues.push(rx);
            let plain = &plain;
            scope.spawn(move || {
                let mut buf = vec![0u8; piece];
                let mut group = first;
                while group < groups {
                    let tokens = group * GROUP..((group + 1) * GROUP).min(count);
                    let mut lines = Vec::with_capacity(GROUP as usize);
                    let mut failure = None;
                    for t in tokens {
                        let offset = t * piece64;
                        let len = usize::try_from(size.saturating_sub(offset).min(piece64))
                            .unwrap_or(piece);
                        if let Err(err) = file.read_exact_at(&mut buf[..len], offset) {
                            failure = Some(if err.kind() == io::ErrorKind::UnexpectedEof {
                                io::Error::other("the file shrank during the transfer")
                            } else {
                                err
                            });
                            break;
                        }
                        lines.push(cipher.encrypt(&plain(t, &buf[..len])));
                    }
                    let failed = failure.is_some();
                    let item = match failure {
                        Some(err) => Err(err),
                        None => Ok(lines),
                    };
                    if tx.send(item).is_err() || failed {
                        return;
                    }
                    group += workers;
                }
            });
        }
        for group in 0..groups {
            let Ok(lines) = queues[(group % workers) as usize].recv() else {
                return Err(io::Error::other("an encryption worker stopped"));
            };
            for line in lines? {
                if !emit(line) {
                    return Ok(());
                }
            }
        }
        Ok(())
        // Dropping the queues here stops workers that are still ahead.
    })
}

/// Bytes of token lines handed on at once by [`encrypt_batched`].
pub const BATCH: usize = 256 * 1024;

/// Encrypts the tokens of `layout` like [`encrypt_pieces`] and hands them on as lines (token,
/// CRLF) in batches of about [`BATCH`] bytes: `send(batch, tokens_so_far)` returns `false` to
/// stop. A batch is only sent while more tokens follow; the tail, with the last line, is
/// returned for the caller to finish (an end token of its own, or the last CRLF dropped).
///
/// # Errors
/// As [`encrypt_pieces`].
pub fn encrypt_batched<P, S>(
    file: &File,
    layout: Layout,
    cipher: &Cipher,
    plain: P,
    mut send: S,
) -> io::Result<bytes::BytesMut>
where
    P: Fn(u64, &[u8]) -> Vec<u8> + Sync,
    S: FnMut(bytes::Bytes, u64) -> bool,
{
    let mut batch = bytes::BytesMut::with_capacity(BATCH + 2 * layout.piece);
    let mut done = 0u64;
    encrypt_pieces(
        file,
        layout,
        workers_for(layout.count),
        cipher,
        plain,
        |line| {
            batch.extend_from_slice(line.as_bytes());
            batch.extend_from_slice(b"\r\n");
            done += 1;
            done == layout.count || batch.len() < BATCH || send(batch.split().freeze(), done)
        },
    )?;
    Ok(batch)
}

/// Worker threads worth using for `count` tokens on this machine.
pub fn workers_for(count: u64) -> usize {
    if count < 8 {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_in_order_with_the_right_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        let cipher = Cipher::new(&[3u8; 32]);
        for workers in [1, 2, 3] {
            let mut got = Vec::new();
            encrypt_pieces(
                &file,
                Layout {
                    size: 100_000,
                    piece: 4096,
                    count: 25,
                },
                workers,
                &cipher,
                |t, p| {
                    let mut v = t.to_be_bytes().to_vec();
                    v.extend_from_slice(p);
                    v
                },
                |line| {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_secs();
                    got.push(cipher.decrypt_path(&line, now).unwrap());
                    true
                },
            )
            .unwrap();
            assert_eq!(got.len(), 25);
            let mut joined = Vec::new();
            for (t, plain) in got.iter().enumerate() {
                assert_eq!(&plain[..8], &(t as u64).to_be_bytes());
                joined.extend_from_slice(&plain[8..]);
            }
            assert_eq!(joined, data);
        }
        // A file shorter than announced is an error, not a short transfer.
        let err = encrypt_pieces(
            &file,
            Layout {
                size: 200_000,
                piece: 4096,
                count: 49,
            },
            2,
            &cipher,
            |_, p| p.to_vec(),
            |_| true,
        );
        assert!(err.is_err());
    }

    #[test]
    fn batches_hold_whole_lines_and_the_tail_holds_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data = vec![5u8; 600_000];
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        let cipher = Cipher::new(&[4u8; 32]);
        let layout = Layout {
            size: 600_000,
            piece: 16_384,
            count: 37,
        };
        let mut sent = Vec::new();
        let mut counts = Vec::new();
        let tail = encrypt_batched(
            &file,
            layout,
            &cipher,
            |_, p| p.to_vec(),
            |batch, done| {
                assert!(batch.len() >= BATCH && batch.ends_with(b"\r\n"));
                sent.extend_from_slice(&batch);
                counts.push(done);
                true
            },
        )
        .unwrap();
        assert!(!counts.is_empty() && counts.iter().all(|&done| done < 37));
        sent.extend_from_slice(&tail);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut joined = Vec::new();
        for line in sent.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let text = std::str::from_utf8(line).unwrap().trim_end();
            joined.extend_from_slice(&cipher.decrypt_path(text, now).unwrap());
        }
        assert_eq!(joined, data);
    }
}
