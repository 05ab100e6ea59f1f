//! A connection's bounded outbound queue.
//!
//! Pushes append a shared [`Frame`] (a reference-count increment, no copy) under
//! a short mutex; the connection's task swaps the whole queue out and writes it
//! in one batch. Both sides keep their buffers, so a steady stream of pushes
//! allocates nothing. When the queue is full the [`SlowConsumer`] policy
//! applies: close the connection (default) or drop the frame.
//!
//! A std mutex and not a tokio one: it is never held across an `.await`. The
//! writer is woken through an `AtomicWaker` and a flag, not a `Notify`: one
//! consumer, and waking it must cost as little as possible since a fan-out
//! wakes thousands of them.
//!
//! **Direct writes.** A WebSocket connection on a plain TCP socket attaches
//! its socket here. A push that finds nothing queued then writes the frame to
//! the socket itself, from the pushing thread, without waking the
//! connection's task: a paced fan-out costs one `writev` per recipient and
//! nothing else. Only what the socket does not take at once (a full socket
//! buffer, a partial write) is queued for the task, which writes it when the
//! socket is writable. Every write to the socket, direct or from the task,
//! happens under the mutex, so frames never interleave; the connection's own
//! control frames (pongs, pings, close) go through [`Outbox::write_control`]
//! under the same rule.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::task::Poll;

use futures_util::task::AtomicWaker;
use switchboard_core::Frame;
use tokio::net::TcpStream;

use crate::config::SlowConsumer;
use crate::handler::CloseReason;

/// The outcome of queueing one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Queued {
    /// Queued for writing.
    Yes,
    /// The queue is full and the frame was dropped; the connection stays.
    Dropped,
    /// The queue is full and the connection is being closed as slow.
    Overflowed,
    /// The connection is closing; the frame was not queued.
    Closing,
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Frame>,
    bytes: usize,
    /// Bytes of the front frame already on the socket (direct writes only).
    offset: usize,
    /// A control frame is partly on the socket: data frames must wait for it.
    control_partial: bool,
    closing: Option<CloseReason>,
}

/// Capacity limits of one outbox.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caps {
    pub(crate) frames: usize,
    pub(crate) bytes: usize,
    pub(crate) policy: SlowConsumer,
}

#[derive(Debug)]
pub(crate) struct Outbox {
    state: Mutex<State>,
    /// Set when there is something for the writer to look at.
    signal: AtomicBool,
    waker: AtomicWaker,
    caps: Caps,
    /// The WebSocket connection's socket, once attached: see "Direct writes".
    socket: OnceLock<TcpStream>,
}

impl Outbox {
    pub(crate) fn new(caps: Caps) -> Self {
        Self {
            state: Mutex::new(State::default()),
            signal: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            caps,
            socket: OnceLock::new(),
        }
    }

    /// Attaches the socket of a WebSocket connection: from now on pushes may
    /// write to it directly (see the module notes). Frames queued before stay
    /// first, since a push writes directly only when nothing is queued.
    pub(crate) fn attach(&self, socket: TcpStream) {
        let _ = self.socket.set(socket);
    }

    /// The attached socket.
    pub(crate) fn socket(&self) -> Option<&TcpStream> {
        self.socket.get()
    }

    fn wake(&self) {
        self.signal.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves the queue consistent (every
        // mutation is a single push or swap), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a frame for writing.
    pub(crate) fn push(&self, frame: &Frame) -> Queued {
        let mut s = self.lock();
        if s.closing.is_some() {
            return Queued::Closing;
        }
        let full = s.frames.len() >= self.caps.frames
            || (s.bytes + frame.len() > self.caps.bytes && !s.frames.is_empty());
        if full {
            return match self.caps.policy {
                SlowConsumer::DropNewest => Queued::Dropped,
                SlowConsumer::Close => {
                    s.closing = Some(CloseReason::SlowConsumer);
                    drop(s);
                    self.wake();
                    Queued::Overflowed
                }
            };
        }
        let was_empty = s.frames.is_empty();
        if was_empty
            && !s.control_partial
            && let Some(socket) = self.socket.get()
        {
            match crate::transport::ws::write_frames(socket, std::iter::once(frame), 0) {
                Ok((1, _)) => return Queued::Yes,
                // Partly written: the task writes the rest.
                Ok((_, offset)) => s.offset = offset,
                // Full, or broken: the task waits for room, or finds the error
                // itself and closes the connection.
                Err(_) => {}
            }
        }
        s.bytes += frame.len();
        s.frames.push_back(frame.clone());
        drop(s);
        // The writer drains everything each time it wakes, so only the push that
        // makes the queue non-empty needs to wake it.
        if was_empty {
            self.wake();
        }
        Queued::Yes
    }

    /// Asks the connection to close. The first reason wins. Returns whether this
    /// call set it.
    pub(crate) fn close(&self, reason: CloseReason) -> bool {
        let mut s = self.lock();
        if s.closing.is_some() {
            return false;
        }
        s.closing = Some(reason);
        drop(s);
        self.wake();
        true
    }

    /// Moves every queued frame into `into` (which must be empty) and returns
    /// the close request, if any. For connections without an attached socket.
    pub(crate) fn drain(&self, into: &mut VecDeque<Frame>) -> Option<CloseReason> {
        debug_assert!(into.is_empty());
        let mut s = self.lock();
        std::mem::swap(&mut s.frames, into);
        s.bytes = 0;
        s.closing.clone()
    }

    /// Drops every queued frame (a close that does not flush), except one
    /// partly on the socket already: the peer must get it whole before
    /// anything else.
    pub(crate) fn discard(&self) {
        let mut s = self.lock();
        let keep = usize::from(s.offset > 0);
        s.frames.truncate(keep);
        s.bytes = s.frames.iter().map(Frame::len).sum();
    }

    /// Writes the queued frames to the attached socket, as far as it takes
    /// them. `Ok(true)` when nothing is left queued, `Ok(false)` when the
    /// socket is full or a control frame must finish first.
    pub(crate) fn write_queued(&self) -> io::Result<bool> {
        let Some(socket) = self.socket.get() else {
            return Ok(true);
        };
        let mut s = self.lock();
        if s.control_partial {
            return Ok(false);
        }
        while !s.frames.is_empty() {
            let State {
                frames,
                offset,
                bytes,
                ..
            } = &mut *s;
            match crate::transport::ws::write_frames(socket, frames.iter(), *offset) {
                Ok((done, rest)) => {
                    for f in frames.drain(..done) {
                        *bytes = bytes.saturating_sub(f.len());
                    }
                    *offset = rest;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        // Connections with a socket rarely queue (only when it is full): an
        // idle one should not keep the queue's buffer.
        s.frames = VecDeque::new();
        Ok(true)
    }

    /// Writes control bytes (tungstenite's buffer) to the attached socket:
    /// `WouldBlock` while a data frame is partly written.
    pub(crate) fn write_control(&self, buf: &[u8]) -> io::Result<usize> {
        let Some(socket) = self.socket.get() else {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "no socket"));
        };
        let mut s = self.lock();
        if s.offset != 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = socket.try_write(buf)?;
        // tungstenite hands over everything it holds each time: what is left
        // is the tail of a frame already begun.
        s.control_partial = n < buf.len();
        Ok(n)
    }

    /// Whether a control frame is partly written.
    pub(crate) fn control_partial(&self) -> bool {
        self.lock().control_partial
    }

    /// The close request, if any.
    pub(crate) fn closing(&self) -> Option<CloseReason> {
        self.lock().closing.clone()
    }

    /// Waits until frames are queued or a close is requested. Only the
    /// connection's own task waits (one waker).
    pub(crate) fn wait(&self) -> impl Future<Output = ()> + '_ {
        poll_fn(move |cx| {
            if self.signal.swap(false, Ordering::AcqRel) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            // A wake between the check and the registration set the flag.
            if self.signal.swap(false, Ordering::AcqRel) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    /// Waits until a close is requested (used to abort a stalled write).
    pub(crate) async fn wait_closing(&self) -> CloseReason {
        loop {
            if let Some(r) = self.closing() {
                return r;
            }
            self.wait().await;
        }
    }

    /// Frames queued now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().frames.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(policy: SlowConsumer) -> Caps {
        Caps {
            frames: 3,
            bytes: 10,
            policy,
        }
    }

    #[test]
    fn close_policy_closes_on_overflow() {
        let o = Outbox::new(caps(SlowConsumer::Close));
        let f = Frame::text("ab");
        for _ in 0..3 {
            assert_eq!(o.push(&f), Queued::Yes);
        }
        assert_eq!(o.push(&f), Queued::Overflowed);
        assert_eq!(o.closing(), Some(CloseReason::SlowConsumer));
        assert_eq!(o.push(&f), Queued::Closing);
        assert_eq!(o.len(), 3);
    }

    #[test]
    fn drop_policy_keeps_the_connection() {
        let o = Outbox::new(caps(SlowConsumer::DropNewest));
        assert_eq!(o.push(&Frame::text("123456")), Queued::Yes);
        // The byte cap applies too.
        assert_eq!(o.push(&Frame::text("123456")), Queued::Dropped);
        assert_eq!(o.closing(), None);
        let mut out = VecDeque::new();
        assert_eq!(o.drain(&mut out), None);
        assert_eq!(out.len(), 1);
        out.clear();
        assert_eq!(o.push(&Frame::text("123456")), Queued::Yes);
    }

    #[test]
    fn an_oversized_frame_still_passes_an_empty_queue() {
        let o = Outbox::new(caps(SlowConsumer::Close));
        assert_eq!(o.push(&Frame::text("x".repeat(50))), Queued::Yes);
    }

    /// A connected socket pair on loopback: (server side, client side).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (server, client)
    }

    /// Reads WebSocket server frames (unmasked, unfragmented) until `n` have
    /// arrived; returns their payloads.
    async fn read_frames(client: &mut TcpStream, n: usize) -> Vec<Vec<u8>> {
        use tokio::io::AsyncReadExt;
        let mut out = Vec::new();
        while out.len() < n {
            let mut h = [0u8; 2];
            client.read_exact(&mut h).await.unwrap();
            assert_eq!(h[0], 0x81, "a text frame, whole, where a frame starts");
            let len = match h[1] {
                126 => {
                    let mut l = [0u8; 2];
                    client.read_exact(&mut l).await.unwrap();
                    usize::from(u16::from_be_bytes(l))
                }
                127 => {
                    let mut l = [0u8; 8];
                    client.read_exact(&mut l).await.unwrap();
                    u64::from_be_bytes(l) as usize
                }
                l => usize::from(l),
            };
            let mut data = vec![0u8; len];
            client.read_exact(&mut data).await.unwrap();
            out.push(data);
        }
        out
    }

    fn big_caps() -> Caps {
        Caps {
            frames: 1 << 20,
            bytes: usize::MAX,
            policy: SlowConsumer::Close,
        }
    }

    #[tokio::test]
    async fn a_push_to_a_socket_with_room_is_written_without_waking_the_task() {
        let (server, mut client) = pair().await;
        let o = Outbox::new(big_caps());
        o.attach(server);
        assert_eq!(o.push(&Frame::text("hello")), Queued::Yes);
        assert_eq!(o.len(), 0, "nothing queued");
        assert!(!o.signal.load(Ordering::Acquire), "the task was not woken");
        assert_eq!(read_frames(&mut client, 1).await, vec![b"hello".to_vec()]);
    }

    #[tokio::test]
    async fn frames_queued_before_the_socket_stay_first() {
        let (server, mut client) = pair().await;
        let o = Outbox::new(big_caps());
        assert_eq!(o.push(&Frame::text("welcome")), Queued::Yes);
        o.attach(server);
        assert_eq!(o.push(&Frame::text("second")), Queued::Yes);
        assert_eq!(
            o.len(),
            2,
            "queued behind the greeting, not written past it"
        );
        assert!(o.write_queued().unwrap());
        assert_eq!(
            read_frames(&mut client, 2).await,
            vec![b"welcome".to_vec(), b"second".to_vec()]
        );
    }

    #[tokio::test]
    async fn a_full_socket_queues_in_order_and_control_frames_wait_their_turn() {
        let (server, mut client) = pair().await;
        let o = Outbox::new(big_caps());
        o.attach(server);
        // Push until the socket stops taking frames whole (the client reads
        // nothing meanwhile).
        let payload = |i: usize| format!("{i:08}").repeat(1000);
        let mut sent = 0;
        while o.len() == 0 {
            assert_eq!(o.push(&Frame::text(payload(sent))), Queued::Yes);
            sent += 1;
            assert!(sent < 100_000, "the socket never filled");
        }
        for _ in 0..3 {
            assert_eq!(o.push(&Frame::text(payload(sent))), Queued::Yes);
            sent += 1;
        }
        assert!(
            o.signal.load(Ordering::Acquire),
            "the task is woken to finish"
        );
        if o.lock().offset > 0 {
            // A data frame is partly on the wire: a control frame must wait.
            let e = o.write_control(&[0x89, 0]).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        }
        // The task's part: write what is queued as the client reads.
        let reader = tokio::spawn(async move { read_frames(&mut client, sent).await });
        while !o.write_queued().unwrap() {
            o.socket().unwrap().writable().await.unwrap();
        }
        let got = reader.await.unwrap();
        let want: Vec<Vec<u8>> = (0..sent).map(|i| payload(i).into_bytes()).collect();
        assert_eq!(got, want, "every frame, whole and in order");
        assert_eq!(
            o.write_control(&[0x89, 0]).unwrap(),
            2,
            "control after data"
        );
    }

    #[tokio::test]
    async fn first_push_wakes_the_writer() {
        let o = std::sync::Arc::new(Outbox::new(caps(SlowConsumer::Close)));
        let o2 = o.clone();
        let waiter = tokio::spawn(async move { o2.wait().await });
        tokio::task::yield_now().await;
        o.push(&Frame::text("a"));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("writer woken")
            .expect("task");
        assert!(o.close(CloseReason::Shutdown));
        assert!(!o.close(CloseReason::SlowConsumer), "first reason wins");
        assert_eq!(o.wait_closing().await, CloseReason::Shutdown);
    }
}
