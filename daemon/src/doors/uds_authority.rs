//! gRPC C-core clients (grpcio: py-spiffe, Ruby, C++) send the percent-encoded socket path as
//! HTTP/2 `:authority` on a Unix socket (`tmp%2Fx%2Fworkload.sock`, grpc/grpc#38142). `h2`
//! rejects such a request as malformed (hyperium/h2#487, not merged), so a SPIFFE client that
//! works against SPIRE would fail against us. This reader sits between the socket and `h2`:
//! it re-encodes every request header block, replacing an `:authority` that is not a valid
//! URI authority with `localhost` (what grpc-go and Kubernetes use on Unix sockets), and
//! passes every other frame through unchanged. The authority is never used for anything.
//!
//! All header blocks go through one HPACK decoder (the client's table) and one encoder (the
//! table `h2` sees), so the two dynamic tables stay consistent. Anything that is not
//! well-formed HTTP/2 (an oversized frame, a broken header block) ends the connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface (RFC 9113 §3.4).
const PREFACE_LEN: usize = 24;
/// Largest frame payload: the default SETTINGS_MAX_FRAME_SIZE, which the server never raises.
pub const MAX_FRAME: usize = 16_384;
/// Largest header block (all of a HEADERS frame and its CONTINUATIONs).
const MAX_BLOCK: usize = 64 * 1024;
/// HPACK dynamic table size both sides use (the default SETTINGS_HEADER_TABLE_SIZE).
const TABLE_SIZE: usize = 4096;
/// Largest decoded header list (RFC 9113 size: name + value + 32 per field), checked while
/// decoding: a small block that references a large table entry many times must not make the
/// daemon build a huge list. The server advertises the same SETTINGS_MAX_HEADER_LIST_SIZE.
pub const MAX_HEADER_LIST: usize = 16 * 1024;

const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

fn bad(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("HTTP/2: {why}"))
}

/// An HTTP/2 server-side stream whose inbound `:authority` values are made valid.
pub struct AuthorityFix<T> {
    inner: T,
    raw: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    preface_left: usize,
    block: Vec<u8>,
    block_stream: u32,
    block_end_stream: bool,
    in_block: bool,
    eof: bool,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    /// Until the client's preface is in: a client that connects and never speaks is dropped
    /// (neither h2 nor hyper bounds the handshake).
    handshake: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> AuthorityFix<T> {
    /// `handshake`: how long the client has to send its connection preface.
    pub fn with_handshake_timeout(inner: T, handshake: std::time::Duration) -> AuthorityFix<T> {
        let mut me = AuthorityFix::new(inner);
        me.handshake = Some(Box::pin(tokio::time::sleep(handshake)));
        me
    }

    pub fn new(inner: T) -> AuthorityFix<T> {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        let mut encoder = loona_hpack::Encoder::new();
        encoder.set_max_table_size(TABLE_SIZE);
        AuthorityFix {
            inner,
            raw: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            preface_left: PREFACE_LEN,
            block: Vec::new(),
            block_stream: 0,
            block_end_stream: false,
            in_block: false,
            eof: false,
            decoder,
            encoder,
            handshake: None,
        }
    }

    /// Move every complete frame from `raw` to `out`, header blocks re-encoded.
    fn process(&mut self) -> io::Result<()> {
        loop {
            if self.preface_left > 0 {
                let n = self.preface_left.min(self.raw.len());
                self.out.extend(self.raw.drain(..n));
                self.preface_left -= n;
                if self.preface_left > 0 {
                    return Ok(());
                }
                continue;
            }
            if self.raw.len() < 9 {
                return Ok(());
            }
            let len = u32::from_be_bytes([0, self.raw[0], self.raw[1], self.raw[2]]) as usize;
            if len > MAX_FRAME {
                return Err(bad("frame larger than SETTINGS_MAX_FRAME_SIZE"));
            }
            if self.raw.len() < 9 + len {
                return Ok(());
            }
            let ty = self.raw[3];
            let flags = self.raw[4];
            let stream = u32::from_be_bytes([self.raw[5], self.raw[6], self.raw[7], self.raw[8]])
                & 0x7fff_ffff;
            let frame: Vec<u8> = self.raw.drain(..9 + len).collect();
            let payload = &frame[9..];
            match ty {
                HEADERS => {
                    if self.in_block {
                        return Err(bad("HEADERS inside a header block"));
                    }
                    let mut p = payload;
                    let mut pad = 0usize;
                    if flags & PADDED != 0 {
                        pad = *p.first().ok_or_else(|| bad("short HEADERS"))? as usize;
                        p = &p[1..];
                    }
                    if flags & PRIORITY != 0 {
                        p = p.get(5..).ok_or_else(|| bad("short HEADERS"))?;
                    }
                    let end = p.len().checked_sub(pad).ok_or_else(|| bad("bad padding"))?;
                    self.block.clear();
                    self.block.extend_from_slice(&p[..end]);
                    self.block_stream = stream;
                    self.block_end_stream = flags & END_STREAM != 0;
                    self.in_block = true;
                    if flags & END_HEADERS != 0 {
                        self.flush_block()?;
                    }
                }
                // A client never pushes (RFC 9113 §8.4); its block would be decoded by h2
                // with the table only this reader's encoder may fill.
                PUSH_PROMISE => return Err(bad("PUSH_PROMISE from a client")),
                CONTINUATION => {
                    if !self.in_block || stream != self.block_stream {
                        return Err(bad("CONTINUATION outside its header block"));
                    }
                    self.block.extend_from_slice(payload);
                    if self.block.len() > MAX_BLOCK {
                        return Err(bad("header block too large"));
                    }
                    if flags & END_HEADERS != 0 {
                        self.flush_block()?;
                    }
                }
                _ => {
                    if self.in_block {
                        return Err(bad("a frame inside a header block"));
                    }
                    self.out.extend_from_slice(&frame);
                }
            }
        }
    }

    /// Decode the finished header block, fix `:authority`, encode it again as HEADERS (and
    /// CONTINUATION frames when it does not fit one).
    fn flush_block(&mut self) -> io::Result<()> {
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut size = 0usize;
        let mut too_large = false;
        self.decoder
            .decode_with_cb(&self.block, |n, v| {
                size = size.saturating_add(n.len() + v.len() + 32);
                if size > MAX_HEADER_LIST {
                    too_large = true;
                } else {
                    headers.push((n.into_owned(), v.into_owned()));
                }
            })
            .map_err(|e| bad(&format!("header block: {e}")))?;
        if too_large {
            return Err(bad("header list larger than SETTINGS_MAX_HEADER_LIST_SIZE"));
        }
        for (name, value) in headers.iter_mut() {
            if name.as_slice() == b":authority"
                && http::uri::Authority::try_from(value.as_slice()).is_err()
            {
                *value = b"localhost".to_vec();
            }
        }
        let encoded = self
            .encoder
            .encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let mut chunks = encoded.chunks(MAX_FRAME).peekable();
        let mut first = true;
        // An empty block is still one HEADERS frame.
        let empty: &[u8] = &[];
        let mut next = chunks.next().unwrap_or(empty);
        loop {
            let last = chunks.peek().is_none();
            let (ty, mut flags) = if first {
                (HEADERS, if self.block_end_stream { END_STREAM } else { 0 })
            } else {
                (CONTINUATION, 0)
            };
            if last {
                flags |= END_HEADERS;
            }
            let len = next.len() as u32;
            self.out.extend_from_slice(&len.to_be_bytes()[1..]);
            self.out.push(ty);
            self.out.push(flags);
            self.out.extend_from_slice(&self.block_stream.to_be_bytes());
            self.out.extend_from_slice(next);
            first = false;
            match chunks.next() {
                Some(c) => next = c,
                None => break,
            }
        }
        self.block.clear();
        self.in_block = false;
        Ok(())
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for AuthorityFix<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        loop {
            if me.out_pos < me.out.len() {
                let n = (me.out.len() - me.out_pos).min(buf.remaining());
                buf.put_slice(&me.out[me.out_pos..me.out_pos + n]);
                me.out_pos += n;
                if me.out_pos == me.out.len() {
                    me.out.clear();
                    me.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            me.process()?;
            if me.preface_left == 0 {
                me.handshake = None;
            }
            if !me.out.is_empty() {
                continue;
            }
            if let Some(t) = me.handshake.as_mut() {
                if t.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "HTTP/2: no connection preface in time",
                    )));
                }
            }
            if me.eof {
                return Poll::Ready(Ok(()));
            }
            let mut tmp = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut me.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    if rb.filled().is_empty() {
                        me.eof = true;
                    } else {
                        me.raw.extend_from_slice(rb.filled());
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.push(ty);
        f.push(flags);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn run(input: &[u8]) -> io::Result<Vec<u8>> {
        let mut fix = AuthorityFix::new(());
        fix.raw.extend_from_slice(input);
        fix.process()?;
        Ok(fix.out)
    }

    type Headers = Vec<(Vec<u8>, Vec<u8>)>;

    /// Decode the frames `h2` would see: (type, flags, stream, decoded headers).
    fn frames_of(out: &[u8]) -> Vec<(u8, u8, u32, Headers)> {
        let mut d = loona_hpack::Decoder::new();
        let mut v = vec![];
        let mut p = &out[PREFACE_LEN..];
        while !p.is_empty() {
            let len = u32::from_be_bytes([0, p[0], p[1], p[2]]) as usize;
            let (ty, flags) = (p[3], p[4]);
            let stream = u32::from_be_bytes([p[5], p[6], p[7], p[8]]);
            let payload = &p[9..9 + len];
            let h = if ty == HEADERS {
                d.decode(payload).unwrap()
            } else {
                vec![]
            };
            v.push((ty, flags, stream, h));
            p = &p[9 + len..];
        }
        v
    }

    #[test]
    fn a_path_authority_becomes_localhost_and_the_rest_is_kept() {
        let mut enc = loona_hpack::Encoder::new();
        let hs = |auth: &'static [u8]| -> Vec<(&'static [u8], &'static [u8])> {
            vec![
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", b"/SpiffeWorkloadAPI/FetchJWTSVID"),
                (b":authority", auth),
                (b"workload.spiffe.io", b"true"),
            ]
        };
        let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        input.extend(frame(0x4, 0, 0, &[]));
        // Padded + priority, split over a CONTINUATION, then a DATA frame.
        let block = enc.encode(hs(b"tmp%2Fwd%2Fworkload.sock"));
        let (a, b) = block.split_at(block.len() / 2);
        let mut payload = vec![2u8];
        payload.extend_from_slice(&[0, 0, 0, 0, 16]);
        payload.extend_from_slice(a);
        payload.extend_from_slice(&[0, 0]);
        input.extend(frame(HEADERS, PADDED | PRIORITY, 1, &payload));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        input.extend(frame(0x0, END_STREAM, 1, b"hello"));
        // A second request reuses the client's dynamic table; a valid authority is kept.
        input.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            3,
            &enc.encode(hs(b"tmp%2Fwd%2Fworkload.sock")),
        ));
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            5,
            &enc.encode(hs(b"localhost:80")),
        ));
        let out = run(&input).unwrap();
        assert_eq!(&out[..PREFACE_LEN], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let f = frames_of(&out);
        assert_eq!(f.len(), 5, "{f:?}");
        assert_eq!((f[0].0, f[0].2), (0x4, 0));
        let auth = |h: &Headers| {
            h.iter()
                .find(|(n, _)| n == b":authority")
                .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
        };
        assert_eq!((f[1].0, f[1].1, f[1].2), (HEADERS, END_HEADERS, 1));
        assert_eq!(auth(&f[1].3).as_deref(), Some("localhost"));
        assert_eq!(f[1].3.len(), 5);
        assert_eq!((f[2].0, f[2].1, f[2].2), (0x0, END_STREAM, 1));
        assert_eq!((f[3].1, f[3].2), (END_HEADERS | END_STREAM, 3));
        assert_eq!(auth(&f[3].3).as_deref(), Some("localhost"));
        assert!(f[3]
            .3
            .iter()
            .any(|(n, v)| n == b":path" && v == b"/SpiffeWorkloadAPI/FetchJWTSVID"));
        assert_eq!(auth(&f[4].3).as_deref(), Some("localhost:80"));
    }

    #[test]
    fn malformed_http2_ends_the_connection() {
        let mut pre = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let mut big = pre.clone();
        big.extend(frame(0x0, 0, 1, &vec![0; MAX_FRAME + 1]));
        assert!(run(&big).is_err());
        let mut stray = pre.clone();
        stray.extend(frame(CONTINUATION, END_HEADERS, 1, b"x"));
        assert!(run(&stray).is_err());
        pre.extend(frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff]));
        assert!(run(&pre).is_err(), "an undecodable block");
        // A small block that expands past the header list limit (one large table entry,
        // referenced again and again) is refused before it is built.
        let mut bomb = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let mut enc = loona_hpack::Encoder::new();
        let big = vec![b'a'; 4000];
        let mut block = enc.encode([(&b"user-agent"[..], &big[..])]);
        block.extend(std::iter::repeat_n(0x80 | 62, 10));
        bomb.extend(frame(HEADERS, END_HEADERS, 1, &block));
        assert!(run(&bomb).is_err(), "a decompression bomb");
        let mut push = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        push.extend(frame(PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2]));
        assert!(run(&push).is_err(), "a client PUSH_PROMISE");
        // Incomplete input is kept for later, not an error.
        assert_eq!(run(b"PRI * HTTP").unwrap(), b"PRI * HTTP");
    }
}
