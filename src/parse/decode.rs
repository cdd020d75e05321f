//! Stream adapters ahead of the parser: UTF-16 to UTF-8 transcoding, and
//! lone `\r` line ends read as `\n` (byte for byte, so offsets stay
//! exact).

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

use super::BoxRead;

/// Transcodes a UTF-16 stream to UTF-8 as it is read (encoding_rs does the
/// decoding; this only moves bytes between buffers).
pub(super) struct Transcode {
    inner: BoxRead,
    /// Bytes of the file read so far (shared with whoever shows progress).
    read: std::sync::Arc<std::sync::atomic::AtomicU64>,
    decoder: encoding_rs::Decoder,
    input: Vec<u8>,
    output: Vec<u8>,
    out_pos: usize,
    finished: bool,
}

impl Transcode {
    pub(super) fn new(
        inner: BoxRead,
        encoding: &'static encoding_rs::Encoding,
        read: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> Self {
        Self {
            inner,
            read,
            decoder: encoding.new_decoder_without_bom_handling(),
            input: vec![0; 32 * 1024],
            output: Vec::with_capacity(64 * 1024),
            out_pos: 0,
            finished: false,
        }
    }
}

/// Reads a file whose lines end in a lone `\r` as one whose lines end in
/// `\n`: every `\r` not followed by `\n` becomes `\n`, byte for byte (so
/// offsets stay exact); a `\r\n` and a `\n` stay as they are. A `\r`
/// that ends a read is held until the byte after it is read.
pub(super) struct LoneCr {
    inner: BoxRead,
    /// Bytes read and converted, `buf[pos..len]` not yet handed on;
    /// `buf[0]` is kept for a held `\r`.
    buf: Box<[u8]>,
    pos: usize,
    len: usize,
    /// The last byte read was a `\r`, not handed on yet.
    held_cr: bool,
    finished: bool,
}

impl LoneCr {
    pub(super) fn new(inner: BoxRead) -> Self {
        Self {
            inner,
            buf: vec![0; 64 * 1024].into_boxed_slice(),
            pos: 0,
            len: 0,
            held_cr: false,
            finished: false,
        }
    }
}

impl AsyncRead for LoneCr {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.pos < this.len {
                let n = (this.len - this.pos).min(out.remaining());
                out.put_slice(&this.buf[this.pos..this.pos + n]);
                this.pos += n;
                return Poll::Ready(Ok(()));
            }
            if this.finished {
                return Poll::Ready(Ok(()));
            }
            let mut rb = ReadBuf::new(&mut this.buf[1..]);
            match this.inner.as_mut().poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    this.finished = n == 0;
                    let start = if this.held_cr { 0 } else { 1 };
                    this.buf[0] = b'\r';
                    this.held_cr = false;
                    let mut end = 1 + n;
                    if n > 0 && this.buf[end - 1] == b'\r' {
                        this.held_cr = true;
                        end -= 1;
                    }
                    // A `\r` at the end of the file is a line end too.
                    let next =
                        |i: usize, buf: &[u8]| buf.get(i + 1).copied().filter(|_| i + 1 < 1 + n);
                    for i in start..end {
                        if this.buf[i] == b'\r' && next(i, &this.buf) != Some(b'\n') {
                            this.buf[i] = b'\n';
                        }
                    }
                    (this.pos, this.len) = (start, end);
                }
            }
        }
    }
}

impl AsyncRead for Transcode {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.output.len() {
                let n = (this.output.len() - this.out_pos).min(buf.remaining());
                buf.put_slice(&this.output[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                return Poll::Ready(Ok(()));
            }
            if this.finished {
                return Poll::Ready(Ok(()));
            }
            let mut rb = ReadBuf::new(&mut this.input);
            match this.inner.as_mut().poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    this.read
                        .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                    let last = n == 0;
                    this.output.clear();
                    this.out_pos = 0;
                    let need = this.decoder.max_utf8_buffer_length(n).unwrap_or(n * 3 + 16);
                    this.output.resize(need, 0);
                    let (_, _, written, _) =
                        this.decoder
                            .decode_to_utf8(&this.input[..n], &mut this.output, last);
                    this.output.truncate(written);
                    this.finished = last;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::io::AsyncReadExt;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    /// A reader handing out `data` a few bytes at a time, pending between
    /// reads, as a network stream does.
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        step: usize,
        ready: bool,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let this = self.get_mut();
            this.ready = !this.ready;
            if !this.ready {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = this
                .step
                .min(this.data.len() - this.at)
                .min(buf.remaining());
            buf.put_slice(&this.data[this.at..this.at + n]);
            this.at += n;
            Poll::Ready(Ok(()))
        }
    }

    proptest! {
        /// Every lone `\r` becomes `\n` and nothing else changes, however
        /// the reads cut the stream.
        #[test]
        fn lone_crs_become_newlines_byte_for_byte(
            data in proptest::collection::vec(proptest::sample::select(vec![b'\r', b'\n', b'a']), 0..64),
            step in 1usize..5,
        ) {
            let expected: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, &b)| if b == b'\r' && data.get(i + 1) != Some(&b'\n') { b'\n' } else { b })
                .collect();
            let reader = Trickle { data, at: 0, step, ready: false };
            let got = rt().block_on(async {
                let mut out = Vec::new();
                LoneCr::new(Box::pin(reader)).read_to_end(&mut out).await.unwrap();
                out
            });
            prop_assert_eq!(got, expected);
        }
    }
}
