//! Several processes (nodes) in one run: the TCP rendezvous that gives every process its global
//! ranks and hands the collective library's root info from node 0 to the others.
//!
//! This is the only network code dsv4 carries itself (the brief: HCCL and NCCL are the engines).
//! It does what `torchrun`'s rendezvous and `HcclGetRootInfo`'s documented usage need: node 0
//! listens on `MASTER_ADDR:MASTER_PORT`, every other node connects, says who it is, and gets its
//! first global rank; once every node has opened its devices, node 0 sends the root info (an
//! opaque blob: `HcclRootInfo`, 4108 bytes; an NCCL unique id would be 128) to all of them, and
//! every rank joins the communicator with it (`HcclCommInitRootInfo(world, root, rank)`).
//!
//! Layout: node `n` of `nnodes` runs `local` ranks (the same number on every node), global ranks
//! `n·local .. (n+1)·local`. One process per device is the case `local = 1`.
//!
//! After the rendezvous the connections stay open. Node 0 can send data to every other node
//! over them ([`NodeGroup::send_to_all`], [`NodeGroup::messages`]: the serving engine's
//! decisions, which the other nodes' engines replay, and `dsv4 chat`'s turns), and [`NodeGroup::watch`] reports a node whose
//! connection closes without a goodbye ([`NodeGroup::finish`]), so a process that dies brings the
//! others to a clear error within about a second, never the collective library's timeout
//! (HCCL's default is 1836 s).
//!
//! Wire format (one frame): `"DSV4"`, a tag byte, a little-endian `u32` payload length, the
//! payload. Every read and connect has a deadline (`DSV4_COMM_TIMEOUT_S`, default 600 s).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Protocol version; both sides must agree.
const VERSION: u32 = 1;
const MAGIC: &[u8; 4] = b"DSV4";
/// The largest handshake payload a peer may announce (a root info is 4 KiB; a fingerprint a
/// few hundred bytes): anything bigger is not a dsv4 peer.
const MAX_HANDSHAKE: u32 = 1 << 20;
/// The largest data payload (a serving tick carries the prompts that arrived: 4 bytes a token).
const MAX_DATA: u32 = 1 << 30;

/// Message tags.
const HELLO: u8 = 1;
const WELCOME: u8 = 2;
const REFUSED: u8 = 3;
const READY: u8 = 4;
const FAILED: u8 = 5;
const ROOT: u8 = 6;
const BYE: u8 = 7;
const DATA: u8 = 8;
const ABORT: u8 = 9;

/// Where this process sits in a multi-process run (`--nnodes`, `--node-rank`,
/// `--master-addr`, `--master-port`; torchrun's names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// Processes in the run.
    pub nnodes: usize,
    /// This process, `0..nnodes`; node 0 listens.
    pub node_rank: usize,
    /// Node 0's address as the others reach it (`host:port`); node 0 listens on every
    /// interface at its port.
    pub master: String,
}

impl NodeSpec {
    /// Checks the numbers: at least one node, the rank below the count, a `host:port`.
    pub fn validate(&self) -> Result<()> {
        if self.nnodes == 0 {
            return Err(Error::config("nnodes", "a run has at least one node"));
        }
        if self.node_rank >= self.nnodes {
            return Err(Error::config(
                "node_rank",
                format!("node rank {} is not below the number of nodes {}", self.node_rank, self.nnodes),
            ));
        }
        if self.nnodes > 1 && port_of(&self.master).is_none() {
            return Err(Error::config(
                "master_addr",
                format!("`{}` is not host:port (give --master-addr HOST --master-port PORT)", self.master),
            ));
        }
        Ok(())
    }
}

/// Node 0's listener: every interface, IPv6 and IPv4, on `port` (0: any free port), or IPv4
/// alone where the host has no IPv6.
///
/// # Errors
/// The IPv4 bind's error, when both fail (the port is taken, or not ours to bind).
fn listen_on_every_interface(port: u16) -> std::io::Result<TcpListener> {
    let ipv6 = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, Some(socket2::Protocol::TCP));
    ipv6.and_then(|socket| listen_dual_stack(socket, port)).or_else(|_| TcpListener::bind(("0.0.0.0", port)))
}

/// `socket` (an IPv6 TCP socket) bound to `[::]:port` and listening, for IPv4 clients as well:
/// IPV6_V6ONLY is cleared first, since a host may set it by default (Linux's
/// `net.ipv6.bindv6only = 1`, and Windows always), and a `[::]` listener then takes IPv6
/// connections only, so the other nodes' IPv4 `--master-addr` would never reach node 0.
/// Address reuse as std sets it on Unix (a restarted node 0 can bind at once).
fn listen_dual_stack(socket: socket2::Socket, port: u16) -> std::io::Result<TcpListener> {
    socket.set_only_v6(false)?;
    #[cfg(unix)]
    socket.set_reuse_address(true)?;
    socket.bind(&std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
    socket.listen(128)?;
    Ok(socket.into())
}

fn port_of(addr: &str) -> Option<u16> {
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}

fn comm_err(node: usize, nnodes: usize, msg: impl Into<String>) -> Error {
    Error::Nodes { node, nnodes, msg: msg.into() }
}

/// One framed connection to another node.
struct Link {
    /// The node at the other end.
    node: usize,
    stream: TcpStream,
}

fn write_frame(stream: &mut TcpStream, tag: u8, payload: &[u8]) -> std::io::Result<()> {
    let limit = if tag == DATA { MAX_DATA } else { MAX_HANDSHAKE };
    if payload.len() > limit as usize {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("a {}-byte message is over the {limit}-byte limit", payload.len()),
        ));
    }
    let mut buf = Vec::with_capacity(9 + payload.len());
    buf.extend_from_slice(MAGIC);
    buf.push(tag);
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(payload);
    stream.write_all(&buf)?;
    stream.flush()
}

/// Why a frame could not be read.
#[derive(Debug)]
enum ReadError {
    /// The peer's process is gone (the connection closed or was reset).
    Closed(String),
    /// Nothing came before the deadline.
    TimedOut,
    /// The peer sent something that is not a frame of this protocol.
    Bad(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Closed(why) => write!(f, "{why}"),
            ReadError::TimedOut => write!(f, "timed out"),
            ReadError::Bad(why) => write!(f, "it sent a bad frame: {why}"),
        }
    }
}

fn io_read_error(e: std::io::Error) -> ReadError {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ReadError::TimedOut,
        std::io::ErrorKind::UnexpectedEof => ReadError::Closed("the connection closed".into()),
        _ => ReadError::Closed(e.to_string()),
    }
}

/// Reads one frame before `deadline` (`None`: wait as long as it takes).
fn read_frame(stream: &mut TcpStream, deadline: Option<Instant>) -> std::result::Result<(u8, Vec<u8>), ReadError> {
    let timeout = match deadline {
        Some(d) => Some(d.checked_duration_since(Instant::now()).filter(|t| !t.is_zero()).ok_or(ReadError::TimedOut)?),
        None => None,
    };
    stream.set_read_timeout(timeout).map_err(|e| ReadError::Closed(e.to_string()))?;
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).map_err(io_read_error)?;
    if &head[..4] != MAGIC {
        return Err(ReadError::Bad("not dsv4's node protocol".into()));
    }
    let len = u32::from_le_bytes([head[5], head[6], head[7], head[8]]);
    let limit = if head[4] == DATA { MAX_DATA } else { MAX_HANDSHAKE };
    if len > limit {
        return Err(ReadError::Bad(format!("a {len}-byte message (the limit is {limit})")));
    }
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload).map_err(io_read_error)?;
    Ok((head[4], payload))
}

/// Where two fingerprints (one item a line) first differ, for the refusal.
fn first_difference(theirs: &str, ours: &str) -> String {
    let (mut a, mut b) = (theirs.lines(), ours.lines());
    loop {
        match (a.next(), b.next()) {
            (Some(x), Some(y)) if x == y => continue,
            (None, None) => {
                return format!("it was started with different arguments (`{theirs:?}`, node 0: `{ours:?}`)")
            }
            (x, y) => {
                let show = |v: Option<&str>| v.map_or("nothing".to_string(), |v| format!("`{v}`"));
                return format!(
                    "it was started with different arguments (it has {} where node 0 has {})",
                    show(x),
                    show(y)
                );
            }
        }
    }
}

fn u32s(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn read_u32s(b: &[u8], n: usize) -> Option<Vec<u32>> {
    (b.len() >= 4 * n)
        .then(|| b[..4 * n].chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// The processes of one run, connected: node 0 to every other node, the others to node 0.
pub struct NodeGroup {
    nnodes: usize,
    node_rank: usize,
    local: usize,
    /// Node 0: one link per other node, in node order; other nodes: the link to node 0.
    links: Mutex<Vec<Link>>,
    /// Set once [`NodeGroup::share`] has run (it may run only once).
    shared: AtomicBool,
    /// Set by [`NodeGroup::finish`]: the watchers stop reporting.
    finished: Arc<AtomicBool>,
    /// Whether the share is done, and a [`NodeGroup::watch`] callback waiting for it (the
    /// watchers start when the share is done: before, they would read its messages).
    pending_watch: Mutex<(bool, Option<LostFn>)>,
    /// Where the watchers deliver node 0's data messages: taken by the watchers.
    inbox: Mutex<Option<std::sync::mpsc::Sender<Vec<u8>>>>,
    /// The other end of `inbox`, until [`NodeGroup::messages`] takes it.
    messages: Mutex<Option<std::sync::mpsc::Receiver<Vec<u8>>>>,
}

type LostFn = Arc<dyn Fn(String) + Send + Sync>;

impl std::fmt::Debug for NodeGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeGroup")
            .field("nnodes", &self.nnodes)
            .field("node_rank", &self.node_rank)
            .field("local", &self.local)
            .finish()
    }
}

impl NodeGroup {
    /// Joins the run `spec` describes with `local` ranks on this process, every process
    /// passing the same `fingerprint` (a description of the command: model, layout, precision;
    /// a node with another is refused, so that nodes started with different arguments never
    /// meet in a collective). Node 0 listens on every interface (IPv6 and IPv4) on the master
    /// port; the others connect, retrying until node 0 is up. Gives up after `timeout`.
    ///
    /// # Errors
    /// [`Error::Config`] for a spec that does not add up; [`Error::Comm`] when the port cannot
    /// be bound, node 0 cannot be reached, a node is missing at the deadline, or the nodes
    /// disagree (node counts, ranks per node, fingerprints, a rank taken twice).
    pub fn join(spec: &NodeSpec, local: usize, fingerprint: &str, timeout: Duration) -> Result<NodeGroup> {
        spec.validate()?;
        if spec.node_rank == 0 {
            let port = if spec.nnodes == 1 { 0 } else { port_of(&spec.master).unwrap_or(0) };
            let listener = listen_on_every_interface(port).map_err(|e| {
                comm_err(0, spec.nnodes, format!("cannot listen on port {port} ({e}): is another run using it?"))
            })?;
            NodeGroup::lead(listener, spec.nnodes, local, fingerprint, timeout)
        } else {
            NodeGroup::follow(&spec.master, spec.nnodes, spec.node_rank, local, fingerprint, timeout)
        }
    }

    /// Node 0's side of [`NodeGroup::join`] on a listener the caller bound (tests bind port 0).
    pub fn lead(
        listener: TcpListener,
        nnodes: usize,
        local: usize,
        fingerprint: &str,
        timeout: Duration,
    ) -> Result<NodeGroup> {
        let fail = |msg: String| comm_err(0, nnodes, msg);
        let deadline = Instant::now() + timeout;
        listener.set_nonblocking(true).map_err(|e| fail(e.to_string()))?;
        let mut links: Vec<Link> = vec![];
        while links.len() + 1 < nnodes {
            let mut stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let mut missing: Vec<usize> =
                            (1..nnodes).filter(|n| !links.iter().any(|l| l.node == *n)).collect();
                        missing.truncate(16);
                        return Err(fail(format!(
                            "timed out after {:.0} s waiting for node(s) {missing:?} of {nnodes} to connect",
                            timeout.as_secs_f64()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => return Err(fail(e.to_string())),
            };
            let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "a peer".into());
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_nodelay(true);
            // A node sends its hello at once; a connection that stays silent is not one.
            let hello_by = deadline.min(Instant::now() + Duration::from_secs(5));
            let (tag, payload) = match read_frame(&mut stream, Some(hello_by)) {
                Ok(f) => f,
                Err(ReadError::Bad(why)) => {
                    let _ =
                        write_frame(&mut stream, REFUSED, format!("node 0 could not read the hello: {why}").as_bytes());
                    continue;
                }
                // Silent or gone (a port scanner, a health check): not a dsv4 node.
                Err(_) => continue,
            };
            let words = read_u32s(&payload, 4).filter(|_| tag == HELLO);
            let Some(words) = words else {
                let _ = write_frame(&mut stream, REFUSED, b"node 0 expected a hello");
                continue;
            };
            let (version, their_nnodes, node, their_local) =
                (words[0], words[1] as usize, words[2] as usize, words[3] as usize);
            let theirs = String::from_utf8_lossy(&payload[16..]).into_owned();
            let problem = if version != VERSION {
                Some(format!("{peer} speaks protocol version {version}, this dsv4 speaks {VERSION}: run the same dsv4 on every node"))
            } else if their_nnodes != nnodes {
                Some(format!("{peer} (node {node}) was started with --nnodes {their_nnodes}, node 0 with {nnodes}"))
            } else if node == 0 || node >= nnodes {
                Some(format!("{peer} says it is node {node}, which is not a node 1..{nnodes}"))
            } else if links.iter().any(|l| l.node == node) {
                Some(format!("two processes say they are node {node} (the second is {peer})"))
            } else if their_local != local {
                Some(format!(
                    "node {node} ({peer}) runs {their_local} device(s), node 0 runs {local}: every node must run the same number"
                ))
            } else if theirs != fingerprint {
                Some(format!("node {node} ({peer}) disagrees with node 0: {}", first_difference(&theirs, fingerprint)))
            } else {
                None
            };
            if let Some(msg) = problem {
                let _ = write_frame(&mut stream, REFUSED, msg.as_bytes());
                for l in &mut links {
                    let _ = write_frame(&mut l.stream, REFUSED, msg.as_bytes());
                }
                return Err(fail(msg));
            }
            let base = (node * local) as u32;
            write_frame(&mut stream, WELCOME, &u32s(&[base, (nnodes * local) as u32]))
                .map_err(|e| fail(format!("node {node} ({peer}): {e}")))?;
            links.push(Link { node, stream });
        }
        links.sort_by_key(|l| l.node);
        Ok(NodeGroup::new(nnodes, 0, local, links))
    }

    /// The side of [`NodeGroup::join`] of every node but 0.
    pub fn follow(
        master: &str,
        nnodes: usize,
        node_rank: usize,
        local: usize,
        fingerprint: &str,
        timeout: Duration,
    ) -> Result<NodeGroup> {
        let fail = |msg: String| comm_err(node_rank, nnodes, msg);
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        let mut stream = loop {
            // A name may resolve late (a container's DNS entry appears with its pod): retry it
            // like a refused connection.
            let addrs = match master.to_socket_addrs() {
                Ok(a) => a.collect::<Vec<_>>(),
                Err(e) => {
                    last = format!("cannot resolve {master}: {e}");
                    vec![]
                }
            };
            let mut got = None;
            for a in addrs {
                match TcpStream::connect_timeout(&a, Duration::from_secs(2)) {
                    Ok(s) => {
                        got = Some(s);
                        break;
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            if let Some(s) = got {
                break s;
            }
            if Instant::now() >= deadline {
                return Err(fail(format!(
                    "could not reach node 0 at {master} within {:.0} s (last error: {last}): is node 0 running, and is \
                     --master-addr an address of its host this node can reach?",
                    timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let _ = stream.set_nodelay(true);
        let mut hello = u32s(&[VERSION, nnodes as u32, node_rank as u32, local as u32]);
        hello.extend_from_slice(fingerprint.as_bytes());
        write_frame(&mut stream, HELLO, &hello).map_err(|e| fail(format!("node 0 at {master}: {e}")))?;
        let (tag, payload) = read_frame(&mut stream, Some(deadline)).map_err(|e| {
            fail(format!("node 0 at {master} did not welcome this node ({e}); every node must have connected by then"))
        })?;
        match tag {
            WELCOME => {
                let w = read_u32s(&payload, 2).ok_or_else(|| fail("a short welcome".into()))?;
                if (w[0] as usize, w[1] as usize) != (node_rank * local, nnodes * local) {
                    return Err(fail(format!(
                        "node 0 placed this node at rank {} of {}, expected {} of {}",
                        w[0],
                        w[1],
                        node_rank * local,
                        nnodes * local
                    )));
                }
            }
            REFUSED => return Err(fail(format!("node 0 refused the run: {}", String::from_utf8_lossy(&payload)))),
            t => return Err(fail(format!("node 0 sent message {t} instead of a welcome"))),
        }
        Ok(NodeGroup::new(nnodes, node_rank, local, vec![Link { node: 0, stream }]))
    }

    fn new(nnodes: usize, node_rank: usize, local: usize, links: Vec<Link>) -> NodeGroup {
        // A peer that stops reading (stalled, not dead) must not block node 0's sends, or a
        // goodbye, forever.
        for l in &links {
            let _ = l.stream.set_write_timeout(Some(crate::parallel::local::default_timeout()));
        }
        // Node 0's data messages queue here from the watchers' start (the end of the share), so
        // a caller may take them before or after it.
        let (inbox, messages) = std::sync::mpsc::channel();
        NodeGroup {
            nnodes,
            node_rank,
            local,
            links: Mutex::new(links),
            shared: AtomicBool::new(false),
            finished: Arc::new(AtomicBool::new(false)),
            pending_watch: Mutex::new((false, None)),
            inbox: Mutex::new(Some(inbox)),
            messages: Mutex::new(Some(messages)),
        }
    }

    pub fn nnodes(&self) -> usize {
        self.nnodes
    }

    pub fn node_rank(&self) -> usize {
        self.node_rank
    }

    /// Ranks on this process.
    pub fn local_ranks(&self) -> usize {
        self.local
    }

    /// The global rank of this process's first rank.
    pub fn base(&self) -> usize {
        self.node_rank * self.local
    }

    /// Ranks over every node.
    pub fn world(&self) -> usize {
        self.nnodes * self.local
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        comm_err(self.node_rank, self.nnodes, msg)
    }

    /// Once every rank of this process has opened its device (or one failed): `mine` is
    /// `Ok(Some(root))` on node 0 (its rank 0 made the root info), `Ok(None)` on the others, or
    /// `Err(why)` where a local rank failed. Returns the root info on every node once all are
    /// ready, or, on every node, the first failure reported (naming its node), so that no rank
    /// enters a collective initialisation its peers never reach. Runs once per group.
    pub fn share(&self, mine: std::result::Result<Option<Vec<u8>>, String>) -> Result<Vec<u8>> {
        if self.shared.swap(true, Ordering::SeqCst) {
            return Err(self.err("the root info was already shared (one communicator per run)"));
        }
        let out = self.share_once(mine);
        let waiting = {
            let mut pending = self.pending_watch.lock().unwrap_or_else(PoisonError::into_inner);
            pending.0 = true;
            pending.1.take()
        };
        match (&out, waiting) {
            (Ok(_), Some(on_lost)) => self.spawn_watchers(on_lost),
            // The run failed for every node with the cause in `out`: a peer exiting now is a
            // consequence, not news (and reporting it could hide the cause). No watcher will
            // deliver messages: their channel ends.
            (Err(_), _) => {
                self.finished.store(true, Ordering::SeqCst);
                self.inbox.lock().unwrap_or_else(PoisonError::into_inner).take();
            }
            _ => {}
        }
        out
    }

    fn share_once(&self, mine: std::result::Result<Option<Vec<u8>>, String>) -> Result<Vec<u8>> {
        let deadline = Instant::now() + crate::parallel::local::default_timeout();
        let mut links = self.links.lock().unwrap_or_else(PoisonError::into_inner);
        if self.node_rank != 0 {
            let link = &mut links[0];
            let sent = match &mine {
                Ok(_) => write_frame(&mut link.stream, READY, &[]),
                Err(why) => write_frame(&mut link.stream, FAILED, why.as_bytes()),
            };
            sent.map_err(|e| self.err(format!("node 0: {e}")))?;
            let (tag, payload) = read_frame(&mut link.stream, Some(deadline))
                .map_err(|e| self.err(format!("waiting for node 0's root info: {e}")))?;
            let text = || String::from_utf8_lossy(&payload).into_owned();
            return match (tag, mine) {
                (_, Err(why)) => Err(self.err(format!("node {} failed before joining: {why}", self.node_rank))),
                (ROOT, Ok(_)) => Ok(payload),
                (FAILED, Ok(_)) => Err(self.err(text())),
                (t, Ok(_)) => Err(self.err(format!("node 0 sent message {t} instead of the root info"))),
            };
        }
        // Node 0: every other node's readiness, then the verdict to all.
        let mut failure = mine.as_ref().err().map(|why| format!("node 0 failed before joining: {why}"));
        for link in links.iter_mut() {
            match read_frame(&mut link.stream, Some(deadline)) {
                Ok((READY, _)) => {}
                Ok((FAILED, why)) => {
                    failure.get_or_insert_with(|| {
                        format!("node {} failed before joining: {}", link.node, String::from_utf8_lossy(&why))
                    });
                }
                Ok((t, _)) => {
                    failure
                        .get_or_insert_with(|| format!("node {} sent message {t} instead of its readiness", link.node));
                }
                Err(e) => {
                    failure.get_or_insert_with(|| format!("node {} did not report ready: {e}", link.node));
                }
            }
        }
        let root = match (&failure, mine) {
            (None, Ok(Some(root))) => root,
            (None, _) => {
                failure = Some("node 0 has no root info to share".into());
                vec![]
            }
            _ => vec![],
        };
        for link in links.iter_mut() {
            let _ = match &failure {
                None => write_frame(&mut link.stream, ROOT, &root),
                Some(msg) => write_frame(&mut link.stream, FAILED, msg.as_bytes()),
            };
        }
        match failure {
            None => Ok(root),
            Some(msg) => Err(self.err(msg)),
        }
    }

    /// Watches every connection on a thread of its own (from the end of [`NodeGroup::share`],
    /// or now if it has run) and calls `on_lost(message)` once when one closes or fails without
    /// the other side's [`NodeGroup::finish`] (its process died or was killed). Callers
    /// typically print the message and exit, since the collective library would otherwise wait
    /// for the lost node until its own timeout.
    pub fn watch(&self, on_lost: impl Fn(String) + Send + Sync + 'static) {
        let on_lost: LostFn = Arc::new(on_lost);
        let mut pending = self.pending_watch.lock().unwrap_or_else(PoisonError::into_inner);
        if pending.0 {
            drop(pending);
            self.spawn_watchers(on_lost);
        } else {
            pending.1 = Some(on_lost);
        }
    }

    fn spawn_watchers(&self, on_lost: LostFn) {
        let reported = Arc::new(AtomicBool::new(false));
        let inbox = self.inbox.lock().unwrap_or_else(PoisonError::into_inner).take();
        let links = self.links.lock().unwrap_or_else(PoisonError::into_inner);
        for link in links.iter() {
            let Ok(mut stream) = link.stream.try_clone() else { continue };
            let (node, me) = (link.node, self.node_rank);
            let (on_lost, reported, finished) = (on_lost.clone(), reported.clone(), self.finished.clone());
            // Only node 0 sends data, so only a link to node 0 has an inbox.
            let inbox = if node == 0 { inbox.clone() } else { None };
            std::thread::Builder::new()
                .name(format!("dsv4-node-watch-{node}"))
                .spawn(move || {
                    let message = loop {
                        match read_frame(&mut stream, None) {
                            Ok((BYE, _)) => return,
                            Ok((DATA, payload)) => {
                                if let Some(inbox) = &inbox {
                                    let _ = inbox.send(payload);
                                }
                            }
                            Ok((ABORT, why)) => {
                                break format!("node {node} stopped the run: {}", String::from_utf8_lossy(&why));
                            }
                            Ok(_) => continue,
                            Err(ReadError::Bad(why)) => {
                                break format!("node {node} {why}; the run cannot continue");
                            }
                            Err(e) => {
                                break format!(
                                    "lost node {node} ({e}): its process stopped; the run cannot continue without it"
                                );
                            }
                        }
                    };
                    if !finished.load(Ordering::SeqCst) && !reported.swap(true, Ordering::SeqCst) {
                        on_lost(format!("node {me}: {message}"));
                    }
                })
                .ok();
        }
    }

    /// On node 0, after [`NodeGroup::share`]: sends `payload` to every other node (their
    /// [`NodeGroup::messages`]), in order. False when a node cannot be reached (its process
    /// stopped); the watchers report that too.
    pub fn send_to_all(&self, payload: &[u8]) -> bool {
        if self.node_rank != 0 {
            return false;
        }
        let mut links = self.links.lock().unwrap_or_else(PoisonError::into_inner);
        let mut all = true;
        for l in links.iter_mut() {
            if write_frame(&mut l.stream, DATA, payload).is_err() {
                // A frame may be half written: close the link, so that the peer sees it gone
                // rather than reading whatever comes next as the rest of the frame.
                let _ = l.stream.shutdown(Shutdown::Both);
                all = false;
            }
        }
        all
    }

    /// On a node other than 0 (with [`NodeGroup::watch`] registered, whose watcher reads
    /// them): the payloads node 0 sends with [`NodeGroup::send_to_all`], in order, from the
    /// first on, whether taken before or after [`NodeGroup::share`]. The channel ends when node
    /// 0 finishes, aborts or is lost (the watcher reports the last two), or when the share
    /// failed; without a registered watcher nothing arrives and it does not end. It is handed
    /// out once: a second call gets one that has ended.
    pub fn messages(&self) -> std::sync::mpsc::Receiver<Vec<u8>> {
        self.messages.lock().unwrap_or_else(PoisonError::into_inner).take().unwrap_or_else(|| {
            let (_, ended) = std::sync::mpsc::channel();
            ended
        })
    }

    /// This process cannot go on (`why`): tells every connected node, whose watchers then
    /// stop their processes naming this node and `why`, instead of their collectives waiting
    /// for this node's ranks until the library's timeout. This process's own watchers stop
    /// reporting.
    pub fn abort(&self, why: &str) {
        let mut links = self.links.lock().unwrap_or_else(PoisonError::into_inner);
        let mut why = why.as_bytes().to_vec();
        why.truncate(64 << 10);
        for link in links.iter_mut() {
            let _ = write_frame(&mut link.stream, ABORT, &why);
        }
        self.finished.store(true, Ordering::SeqCst);
    }

    /// Says goodbye to every connected node (the run ended normally here), so that their
    /// watchers do not report this process as lost when it exits.
    pub fn finish(&self) {
        self.finished.store(true, Ordering::SeqCst);
        let mut links = self.links.lock().unwrap_or_else(PoisonError::into_inner);
        for link in links.iter_mut() {
            let _ = write_frame(&mut link.stream, BYE, &[]);
            let _ = link.stream.shutdown(Shutdown::Write);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(20);

    fn listener() -> (TcpListener, String) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        (l, addr)
    }

    /// Node 0's listener takes IPv4 connections even from a socket that starts IPv6-only, as
    /// on a host with `net.ipv6.bindv6only = 1`; and `listen_on_every_interface` takes them
    /// whatever the host's default.
    #[test]
    fn node_0_listens_for_ipv4_on_an_ipv6_only_default() {
        use socket2::{Domain, Protocol, Socket, Type};
        let listeners: Vec<TcpListener> = match Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)) {
            Ok(socket) => {
                socket.set_only_v6(true).unwrap();
                vec![listen_dual_stack(socket, 0).unwrap(), listen_on_every_interface(0).unwrap()]
            }
            Err(e) => {
                eprintln!("no IPv6 sockets here ({e}): only the IPv4 fallback is checked");
                vec![listen_on_every_interface(0).unwrap()]
            }
        };
        for l in listeners {
            // The kernel completes the connection in the listen backlog (or refuses it at once):
            // connect, then accept, so that a refusal fails the test instead of hanging it.
            // Accepting with a deadline: were the port also held by another process's IPv4
            // socket, the connection would land there and a blocking accept would hang.
            let port = l.local_addr().unwrap().port();
            let _client = TcpStream::connect(("127.0.0.1", port)).expect("an IPv4 connection to node 0's listener");
            l.set_nonblocking(true).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let from = loop {
                match l.accept() {
                    Ok((_, from)) => break from,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(e) => panic!("node 0's listener took no IPv4 connection: {e}"),
                }
            };
            assert!(from.ip().to_canonical().is_loopback(), "{from}");
        }
    }

    /// Runs node 0 and nodes 1.. on threads; each node's result.
    fn run_nodes<R: Send>(
        nnodes: usize,
        local: &[usize],
        prints: &[&str],
        body: impl Fn(usize, Result<NodeGroup>) -> R + Sync,
    ) -> Vec<R> {
        let (l, addr) = listener();
        let mut l = Some(l);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..nnodes)
                .map(|n| {
                    let l = if n == 0 { l.take() } else { None };
                    let (addr, body) = (addr.clone(), &body);
                    s.spawn(move || {
                        let g = match l {
                            Some(l) => NodeGroup::lead(l, nnodes, local[n], prints[n], T),
                            None => NodeGroup::follow(&addr, nnodes, n, local[n], prints[n], T),
                        };
                        body(n, g)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn nodes_get_their_ranks_and_node_0s_root_info() {
        let out = run_nodes(3, &[2, 2, 2], &["x"; 3], |n, g| {
            let g = g.unwrap();
            assert_eq!((g.base(), g.world(), g.node_rank()), (2 * n, 6, n));
            let mine = if n == 0 { Ok(Some(vec![7u8; 4108])) } else { Ok(None) };
            let root = g.share(mine).unwrap();
            g.finish();
            root
        });
        for root in out {
            assert_eq!(root, vec![7u8; 4108]);
        }
    }

    #[test]
    fn a_failure_on_any_node_fails_every_node_naming_it() {
        let out = run_nodes(3, &[1, 1, 1], &["x"; 3], |n, g| {
            let g = g.unwrap();
            let mine = match n {
                0 => Ok(Some(vec![1u8; 8])),
                2 => Err("device 5 is not a device".to_string()),
                _ => Ok(None),
            };
            g.share(mine).unwrap_err().to_string()
        });
        for e in out {
            assert!(e.contains("node 2 failed before joining: device 5 is not a device"), "{e}");
        }
    }

    #[test]
    fn nodes_that_disagree_are_refused_on_both_sides() {
        let out = run_nodes(2, &[2, 2], &["model a tp 2", "model b tp 2"], |_, g| g.unwrap_err().to_string());
        for e in &out {
            assert!(e.contains("started with different arguments"), "{e}");
        }
        let out = run_nodes(2, &[2, 1], &["x", "x"], |_, g| g.unwrap_err().to_string());
        for e in &out {
            assert!(e.contains("every node must run the same number"), "{e}");
        }
    }

    #[test]
    fn a_missing_node_times_out_with_its_number() {
        let (l, _) = listener();
        let e = NodeGroup::lead(l, 3, 1, "x", Duration::from_millis(300)).unwrap_err().to_string();
        assert!(e.contains("waiting for node(s) [1, 2] of 3"), "{e}");
        // Nobody listens at a closed port.
        let (l, addr) = listener();
        drop(l);
        let e = NodeGroup::follow(&addr, 2, 1, 1, "x", Duration::from_millis(300)).unwrap_err().to_string();
        assert!(e.contains("could not reach node 0"), "{e}");
    }

    #[test]
    fn a_node_that_dies_is_reported_and_one_that_finishes_is_not() {
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let tx = Mutex::new(tx);
        run_nodes(3, &[1, 1, 1], &["x"; 3], |n, g| {
            let g = g.unwrap();
            if n == 0 {
                // Registered before the share, as `dsv4` does: it must not read the share's
                // messages.
                let tx = tx.lock().unwrap().clone();
                g.watch(move |m| tx.send(m).unwrap());
            }
            g.share(if n == 0 { Ok(Some(vec![0])) } else { Ok(None) }).unwrap();
            match n {
                0 => {}
                // Node 1 ends normally at once; node 2 "dies" later (its connection drops
                // without a goodbye). Had node 1's goodbye been missed, node 1 would be the
                // first (and, reports being once per group, the only) node reported.
                1 => g.finish(),
                _ => {
                    std::thread::sleep(Duration::from_millis(500));
                    drop(g)
                }
            }
        });
        let msg = rx.recv_timeout(Duration::from_secs(5)).expect("node 0 hears that node 2 is lost");
        assert!(msg.contains("lost node 2"), "{msg}");
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "only the lost node is reported");
    }

    #[test]
    fn an_abort_names_the_node_and_its_reason() {
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let tx = Mutex::new(tx);
        run_nodes(2, &[1, 1], &["x"; 2], |n, g| {
            let g = g.unwrap();
            let tx = tx.lock().unwrap().clone();
            g.watch(move |m| tx.send(m).unwrap());
            g.share(if n == 0 { Ok(Some(vec![0])) } else { Ok(None) }).unwrap();
            if n == 1 {
                g.abort("rank 3: out of device memory");
                std::thread::sleep(Duration::from_millis(300));
            } else {
                std::thread::sleep(Duration::from_millis(600));
                g.finish();
            }
        });
        let msgs: Vec<String> = rx.try_iter().collect();
        assert_eq!(msgs.len(), 1, "{msgs:?}");
        assert!(msgs[0].contains("node 0: node 1 stopped the run: rank 3: out of device memory"), "{msgs:?}");
    }

    #[test]
    fn a_failed_share_starts_no_watchers() {
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let tx = Mutex::new(tx);
        run_nodes(2, &[1, 1], &["x"; 2], |n, g| {
            let g = g.unwrap();
            if n == 0 {
                let tx = tx.lock().unwrap().clone();
                g.watch(move |m| tx.send(m).unwrap());
            }
            let mine = if n == 0 { Ok(Some(vec![0])) } else { Err("device 77 does not exist".into()) };
            assert!(g.share(mine).is_err());
            // Node 1 exits at once; node 0 must not report it as lost.
            if n == 0 {
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        assert!(rx.try_iter().next().is_none());
    }

    #[test]
    fn specs_that_do_not_add_up_are_config_errors() {
        let spec = |nnodes, node_rank, master: &str| NodeSpec { nnodes, node_rank, master: master.into() };
        assert!(spec(2, 2, "h:1").validate().is_err());
        assert!(spec(0, 0, "h:1").validate().is_err());
        assert!(spec(2, 1, "h").validate().is_err());
        assert!(spec(1, 0, "").validate().is_ok());
        assert!(spec(2, 1, "10.0.0.1:29500").validate().is_ok());
    }

    #[test]
    fn node_0s_messages_reach_every_node_in_order_and_end_with_its_goodbye() {
        let (lost_tx, lost) = std::sync::mpsc::channel::<String>();
        let lost_tx = Mutex::new(lost_tx);
        let big = vec![7u8; 3 << 20];
        // Node 1 takes its messages before the share; node 2 only once node 1 has had all of
        // them, i.e. after node 0 sent everything and said goodbye (`dsv4 chat` takes them
        // from a rank's thread, after the share): both get every one.
        let (node_1_done, wait_for_node_1) = std::sync::mpsc::channel::<()>();
        let (node_1_done, wait_for_node_1) = (Mutex::new(node_1_done), Mutex::new(wait_for_node_1));
        let out = run_nodes(3, &[1, 1, 1], &["x"; 3], |n, g| {
            let g = g.unwrap();
            let mut inbox = (n == 1).then(|| g.messages());
            let tx = lost_tx.lock().unwrap().clone();
            g.watch(move |m| tx.send(m).unwrap());
            g.share(if n == 0 { Ok(Some(vec![0])) } else { Ok(None) }).unwrap();
            if n == 2 {
                wait_for_node_1.lock().unwrap().recv().unwrap();
                inbox = Some(g.messages());
            }
            if n != 0 {
                assert!(g.messages().recv().is_err(), "handed out once");
            }
            if n == 0 {
                for i in 0..100u32 {
                    assert!(g.send_to_all(&i.to_le_bytes()));
                }
                // A serving tick with long prompts is megabytes.
                assert!(g.send_to_all(&big));
                g.finish();
                return vec![];
            }
            assert!(!g.send_to_all(b"x"), "only node 0 sends");
            let got: Vec<Vec<u8>> = inbox.unwrap().iter().collect();
            if n == 1 {
                node_1_done.lock().unwrap().send(()).unwrap();
            }
            g.finish();
            got
        });
        let mut want: Vec<Vec<u8>> = (0..100u32).map(|i| i.to_le_bytes().to_vec()).collect();
        want.push(big.clone());
        assert!(out[1] == want && out[2] == want, "{} and {} messages", out[1].len(), out[2].len());
        assert!(lost.try_iter().next().is_none(), "no node was lost");
    }
}
