//! How the user's turns of `dsv4 chat` reach every rank of a split run.
//!
//! Every rank runs the same conversation (same seed, and the ranks' logits are the same bits,
//! so the same replies), but only global rank 0 reads the terminal and prints. That rank — the
//! reader — hands each line it reads to the other ranks of its process by channel and, in a run
//! over several processes (`--nnodes`), to the other nodes with [`NodeGroup::send_to_all`]. On
//! each other node one thread hands node 0's lines to that node's ranks, so their stdin is
//! never read.
//!
//! The conversation ends for every rank when the reader reads the end of input (an empty line,
//! Ctrl-D): it sends the end along. It also ends when the reader's rank stops for any other
//! reason: its channels close with it, and over several processes node 0's goodbye (or its
//! abort, which stops the other nodes with its error) closes the other nodes' inboxes.

use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use dsv4_core::parallel::NodeGroup;

/// One user turn, or `None`: the conversation is over.
pub type Turn = Option<String>;

/// A turn as it crosses to the other nodes: a tag byte, then the line in UTF-8.
const LINE: u8 = 1;
const END: u8 = 0;

fn encode(turn: &Turn) -> Vec<u8> {
    match turn {
        Some(line) => [&[LINE][..], line.as_bytes()].concat(),
        None => vec![END],
    }
}

/// The turn node 0 sent, or why it is unreadable (node 0 never sends such a message: the
/// nodes agreed on the command line, but a different dsv4 build could).
fn decode(payload: &[u8]) -> Result<Turn, String> {
    match payload.split_first() {
        Some((&LINE, text)) => match String::from_utf8(text.to_vec()) {
            Ok(line) => Ok(Some(line)),
            Err(_) => Err("node 0 sent a chat turn that is not UTF-8".into()),
        },
        Some((&END, [])) => Ok(None),
        _ => Err(format!(
            "node 0 sent a message of {} bytes that is not a chat turn (is every node running the same dsv4 build?)",
            payload.len()
        )),
    }
}

/// This process's share of the turn hand-off, made once per process and shared by its ranks.
pub struct ChatTurns {
    /// On the reader's process: the channels to its other local ranks, until the reader's
    /// [`TurnSource`] takes them (so that they close when its rank ends, however it ends).
    senders: Mutex<Option<Vec<Sender<Turn>>>>,
    /// Per local rank, where it receives its turns (the reader's entry is never used).
    receivers: Vec<Mutex<Receiver<Turn>>>,
    /// The run's other processes, if any.
    nodes: Option<Arc<NodeGroup>>,
}

/// Where one rank's turns come from.
pub enum TurnSource<'a> {
    /// Global rank 0: reads the turns and hands each on.
    Reader { local: Vec<Sender<Turn>>, nodes: Option<&'a NodeGroup> },
    /// Every other rank: receives them.
    Follower(MutexGuard<'a, Receiver<Turn>>),
}

impl ChatTurns {
    /// The hand-off for `local` ranks in this process (`local` ≥ 1), in a run over the
    /// processes of `nodes` (`None`: this process is the whole run). On a node other than 0
    /// this starts the thread that hands node 0's turns to the local ranks: it takes the
    /// group's [`NodeGroup::messages`], so nothing else on this process may.
    pub fn new(local: usize, nodes: Option<Arc<NodeGroup>>) -> ChatTurns {
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..local).map(|_| std::sync::mpsc::channel::<Turn>()).unzip();
        let receivers = receivers.into_iter().map(Mutex::new).collect();
        let senders = match &nodes {
            Some(g) if g.node_rank() != 0 => {
                let (inbox, group) = (g.messages(), g.clone());
                std::thread::Builder::new()
                    .name(format!("dsv4-chat-turns-{}", g.node_rank()))
                    .spawn(move || {
                        if let Err(why) = forward(inbox, &senders) {
                            // This node cannot follow the conversation, and the others would
                            // wait for its ranks in their next collective: stop every node.
                            eprintln!("error: {why}");
                            group.abort(&why);
                            crate::exit_now(1);
                        }
                    })
                    .expect("a thread for the chat turns");
                None
            }
            // The reader is local rank 0 here; it sends to local ranks 1.. .
            _ => Some(senders.into_iter().skip(1).collect()),
        };
        ChatTurns { senders: Mutex::new(senders), receivers, nodes }
    }

    /// The turns of this process's rank `local` (0-based within the process). Call it once per
    /// rank, before anything that can fail: the reader's source owns the channels to the
    /// others, which see the end of the conversation when it is dropped.
    pub fn for_rank(&self, local: usize) -> TurnSource<'_> {
        let reader = local == 0 && self.nodes.as_ref().is_none_or(|g| g.node_rank() == 0);
        if reader {
            let senders = self.senders.lock().unwrap_or_else(PoisonError::into_inner).take();
            return TurnSource::Reader { local: senders.unwrap_or_default(), nodes: self.nodes.as_deref() };
        }
        TurnSource::Follower(self.receivers[local].lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl TurnSource<'_> {
    /// Whether this rank reads the turns (and so shows the conversation).
    pub fn is_reader(&self) -> bool {
        matches!(self, TurnSource::Reader { .. })
    }

    /// The next turn: on the reader, what `read` gives, handed to every other rank first; on
    /// the others, the reader's next turn (`read` is not called), or `None` once the reader
    /// has gone.
    pub fn next(&mut self, read: impl FnOnce() -> Turn) -> Turn {
        match self {
            TurnSource::Reader { local, nodes } => {
                let turn = read();
                for tx in local.iter() {
                    // A rank that has ended (its error is reported by its own thread) misses nothing.
                    let _ = tx.send(turn.clone());
                }
                if let Some(g) = nodes {
                    // A node that cannot be reached has stopped: the group's watcher reports it.
                    let _ = g.send_to_all(&encode(&turn));
                }
                turn
            }
            TurnSource::Follower(rx) => rx.recv().ok().flatten(),
        }
    }
}

/// A node other than 0: hands every turn node 0 sends to each local rank, then the end (sent
/// by node 0, or its inbox closing with node 0's goodbye). An unreadable message is an error.
fn forward(inbox: Receiver<Vec<u8>>, ranks: &[Sender<Turn>]) -> Result<(), String> {
    for payload in inbox {
        let turn = decode(&payload)?;
        let end = turn.is_none();
        for tx in ranks {
            let _ = tx.send(turn.clone());
        }
        if end {
            return Ok(());
        }
    }
    for tx in ranks {
        let _ = tx.send(None);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::time::Duration;

    use super::*;

    const T: Duration = Duration::from_secs(30);

    /// `nnodes` processes' groups over the loopback, one thread per node, joined (share done,
    /// watchers running, as after the communicator's start-up); `body(group)` per node; no node
    /// may be reported lost.
    fn on_nodes<R: Send>(nnodes: usize, local: usize, body: impl Fn(Arc<NodeGroup>) -> R + Sync) -> Vec<R> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let listener = Mutex::new(Some(listener));
        let lost = Arc::new(Mutex::new(Vec::<String>::new()));
        let out = std::thread::scope(|s| {
            let handles: Vec<_> = (0..nnodes)
                .map(|n| {
                    let (addr, listener, body, lost) = (&addr, &listener, &body, lost.clone());
                    s.spawn(move || {
                        let g = if n == 0 {
                            let l = listener.lock().unwrap().take().unwrap();
                            NodeGroup::lead(l, nnodes, local, "chat", T).unwrap()
                        } else {
                            NodeGroup::follow(addr, nnodes, n, local, "chat", T).unwrap()
                        };
                        g.watch(move |m| lost.lock().unwrap().push(m));
                        g.share(if n == 0 { Ok(Some(vec![1])) } else { Ok(None) }).unwrap();
                        body(Arc::new(g))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(lost.lock().unwrap().is_empty(), "{:?}", lost.lock().unwrap());
        out
    }

    /// Each of this process's ranks on its own thread: `rank(local, source)`.
    fn on_ranks<R: Send>(turns: &ChatTurns, local: usize, rank: impl Fn(TurnSource<'_>) -> R + Sync) -> Vec<R> {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..local)
                .map(|l| {
                    let rank = &rank;
                    s.spawn(move || rank(turns.for_rank(l)))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Every turn the source gives until the end; the reader reads `script`.
    fn drain(mut source: TurnSource<'_>, script: &[&str]) -> (bool, Vec<String>) {
        let reader = source.is_reader();
        let mut lines = script.iter().map(|l| l.to_string());
        let mut got = vec![];
        while let Some(line) = source.next(|| lines.next()) {
            got.push(line);
        }
        (reader, got)
    }

    const SCRIPT: [&str; 3] = ["hello", "¿qué tal? — ünïcode, \u{1F600}", "a third turn, longer than the others"];

    #[test]
    fn every_rank_of_every_node_gets_the_readers_turns_in_order() {
        let out = on_nodes(3, 2, |g| {
            let node = g.node_rank();
            let turns = ChatTurns::new(2, Some(g.clone()));
            let got = on_ranks(&turns, 2, |source| drain(source, &SCRIPT));
            // Node 0 leaves once its ranks are done, as the CLI does (its goodbye).
            g.finish();
            (node, got)
        });
        for (node, ranks) in out {
            for (local, (reader, got)) in ranks.into_iter().enumerate() {
                assert_eq!(reader, node == 0 && local == 0, "node {node}, local rank {local}");
                assert_eq!(got, SCRIPT, "node {node}, local rank {local}");
            }
        }
    }

    /// The reader's rank stops without reading the end (an error in its rank): its own
    /// process's ranks see their channel close, and the other nodes' ranks see node 0's
    /// goodbye end the conversation, instead of waiting for a line for ever.
    #[test]
    fn the_conversation_ends_everywhere_when_the_reader_stops_early() {
        let out = on_nodes(2, 2, |g| {
            let turns = ChatTurns::new(2, Some(g.clone()));
            let got = on_ranks(&turns, 2, |mut source| {
                if source.is_reader() {
                    let first = source.next(|| Some("only this".to_string()));
                    drop(source);
                    return vec![first.unwrap()];
                }
                drain(source, &[]).1
            });
            if g.node_rank() == 0 {
                g.finish();
            }
            got
        });
        for (node, ranks) in out.iter().enumerate() {
            for (local, got) in ranks.iter().enumerate() {
                assert_eq!(got, &["only this"], "node {node}, local rank {local}");
            }
        }
    }

    /// One process: the reader is local rank 0 and the others follow by channel.
    #[test]
    fn one_process_hands_turns_to_its_ranks() {
        let turns = ChatTurns::new(3, None);
        let got = on_ranks(&turns, 3, |source| drain(source, &SCRIPT));
        assert_eq!(got.iter().filter(|(reader, _)| *reader).count(), 1);
        assert!(got.iter().all(|(_, lines)| lines == &SCRIPT));
    }

    #[test]
    fn turns_cross_nodes_unchanged_and_garbage_is_an_error() {
        for turn in [Some(String::new()), Some(SCRIPT[1].to_string()), None] {
            assert_eq!(decode(&encode(&turn)), Ok(turn));
        }
        assert!(decode(&[LINE, 0xff, 0xfe]).unwrap_err().contains("not UTF-8"));
        for bad in [&[][..], &[END, 1], &[7, b'x']] {
            assert!(decode(bad).unwrap_err().contains("not a chat turn"), "{bad:?}");
        }
        // The forwarding thread stops at it, after handing on the turns before it.
        let (tx, inbox) = std::sync::mpsc::channel();
        for payload in [encode(&Some("a".into())), vec![9]] {
            tx.send(payload).unwrap();
        }
        let (rank, got) = std::sync::mpsc::channel();
        assert!(forward(inbox, &[rank]).is_err());
        assert_eq!(got.try_iter().collect::<Vec<_>>(), [Some("a".to_string())]);
    }
}
