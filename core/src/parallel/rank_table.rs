//! HCCL rank-table files (`RANK_TABLE_FILE`, `hccl.json`): the JSON description of a world's
//! NPUs that `HcclCommInitClusterInfo(rankTableJsonPath, rank, &comm)` reads, the alternative
//! to the root-info bootstrap (`HcclGetRootInfo` / `HcclCommInitRootInfo`). No hardware code:
//! this parses a table, validates it, and checks it against the run dsv4 was asked for, so a
//! wrong table is refused with a message before any device opens (HCCL itself would fail inside
//! the collective initialisation, or wait for ranks that never come).
//!
//! # The format (sources)
//!
//! Huawei's "ranktable" template 1, `"version": "1.0"` (CANN HCCL user guide, "ranktable文件配置
//! 资源信息", hiascend.com `canncommercial/82RC1/hccl/hcclug/hcclug_000014.html`; TensorFlow
//! migration guide "Preparing the Ranktable Resource Configuration File",
//! `TensorFlowCommercial/800/migration/tfmigr2/tfmigr2_000031.html`, whose table marks every field
//! below as required; MindCluster's "hccl.json File Description",
//! `mindcluster/730/clustersched/schedulingug/mxdlug_appendices_009.html`, the file Ascend
//! Operator writes and mounts; example files in `Ascend/MindIE-LLM`
//! `tests/fuzztest_llmmanager/llm_manager/ranktable.json` and `Ascend/MindIE-PyMotor`
//! `tests/jsons/hccl_a2.json`):
//!
//! ```json
//! { "status": "completed", "version": "1.0", "server_count": "2",
//!   "server_list": [
//!     { "server_id": "node_0",
//!       "device": [ { "device_id": "0", "device_ip": "192.168.1.8", "rank_id": "0" },
//!                   { "device_id": "1", "device_ip": "192.168.1.9", "rank_id": "1" } ] },
//!     { "server_id": "node_1",
//!       "device": [ { "device_id": "0", "device_ip": "192.168.2.8", "rank_id": "2" },
//!                   { "device_id": "1", "device_ip": "192.168.2.9", "rank_id": "3" } ] } ] }
//! ```
//!
//! `status` is `"completed"` once the table may be used (`"initializing"` while Ascend Operator
//! still writes it); `server_count` is the number of servers; `server_id` identifies a server
//! and must be unique; `device_id` is the NPU's physical id on its server; `device_ip` its NIC
//! address; `rank_id` the global rank, from 0, unique. Every value is a JSON string: HCCL's
//! parser refuses numbers written as JSON integers (`GetJsonArrayMemberProperty`: "is not
//! string"), and so does dsv4. HCCL also takes only a path ending in `.json`.
//!
//! Version `"1.2"` is the A3 super-node template (same user guide, "超节点模式"): each device
//! also has `super_device_id` (and `device_port`, `backup_device_ip`, `host_port`, ...), each
//! server `host_ip`, and the file a `super_pod_list` of `{super_pod_id, server_list:
//! [{server_id}]}`. dsv4 reads it like 1.0, requires every device's `super_device_id` (HCCL's
//! parser does) and checks that every server of `super_pod_list` is a server of `server_list`.
//!
//! # What dsv4 reads, and what it passes through
//!
//! Read and validated: `status`, `version` (1.0 or 1.2), `server_count`, `server_list[i]`'s
//! `server_id` and `device[j]`'s `device_id` and `rank_id`; for 1.2 the `server_id`s of
//! `super_pod_list`. Everything else (`device_ip`, `super_device_id`, ports, `host_ip`,
//! `container_ip`, `hardware_type`, ...) is passed through untouched: the file is handed to
//! HCCL by its path, and HCCL reads the network fields itself. They are part of what nodes
//! compare when they meet ([`RankTable::fingerprint`]): a stale copy on one node would
//! otherwise pass dsv4's checks and stall inside HCCL. Templates dsv4 does not read
//! (template 2's `group_list`, ClusterD's `server_group_list`) are refused by name.
//!
//! # How a table maps onto a dsv4 run
//!
//! dsv4's global-rank rule (README, "Several processes"): node `R` of `--nnodes N`, each over
//! `D` `--devices`, holds global ranks `R·D .. (R+1)·D`, local rank `r` on `--devices[r]`. With a
//! table, server `i` of `server_list` is node `i` (HCCL numbers servers by their order in the
//! table, as the "serverIdx" of its rank graph does), so [`RankTable::check_run`] requires
//! `server_count` = `--nnodes`, every server `D` devices, server `R`'s rank ids exactly
//! `R·D .. (R+1)·D`, and its device ids, in rank order, equal to this node's `--devices`
//! (physical ids: the CLI maps `--devices` through `ASCEND_RT_VISIBLE_DEVICES` first). The
//! other servers are validated as a table but not against this process (their nodes check
//! themselves; over several processes the nodes also compare their tables when they meet).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The variable the Ascend launchers (MindSpore, Ascend Operator jobs) set to the table's path.
pub const RANK_TABLE_VAR: &str = "RANK_TABLE_FILE";

/// A rank table that failed to read, parse or validate, or that does not describe the run: the
/// message names the file, the field (`server_list[1].device[0].rank_id`) and the rank or
/// server concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankTableError(pub String);

impl std::fmt::Display for RankTableError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RankTableError {}

impl From<RankTableError> for crate::Error {
    fn from(e: RankTableError) -> Self {
        crate::Error::Input(e.0)
    }
}

/// One device of a server, as the table lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableDevice {
    /// `device_id`: the NPU's physical id on its server.
    pub device_id: u32,
    /// `rank_id`: the global rank.
    pub rank_id: usize,
}

/// One entry of `server_list`, its devices in rank order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableServer {
    pub server_id: String,
    pub devices: Vec<TableDevice>,
}

/// A validated rank table: every rank `0..world` exactly once, device ids distinct per server,
/// `server_count` equal to the servers listed, `status` completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankTable {
    /// The file it was read from (named in every message).
    pub path: PathBuf,
    /// `version`: `"1.0"` or `"1.2"`.
    pub version: String,
    /// `server_list`, in the file's order (server `i` is node `i`).
    pub servers: Vec<TableServer>,
    /// Per server, every field of its entry and its devices' (keys sorted, compact JSON), and
    /// `super_pod_list` the same way: what [`RankTable::fingerprint`] adds to the ids.
    pub canonical: Vec<String>,
}

/// `v` with every object's keys sorted, as compact JSON: equal for two files that say the same,
/// however they order or format it.
fn canonical(v: &Value) -> String {
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                Value::Object(keys.into_iter().map(|k| (k.clone(), sorted(&m[k]))).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    sorted(v).to_string()
}

/// A number written as HCCL reads it: a JSON string of digits.
fn number(v: &Value) -> Option<u64> {
    match v {
        Value::String(s) => s.trim().parse().ok().filter(|_| !s.trim().starts_with('+')),
        _ => None,
    }
}

fn shown(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}…", &s[..s.char_indices().nth(57).map_or(s.len(), |(i, _)| i)])
    } else {
        s
    }
}

impl RankTable {
    /// Reads and validates the table at `path`.
    pub fn read(path: &Path) -> Result<RankTable, RankTableError> {
        if path.extension().is_none_or(|e| e != "json") {
            return Err(RankTableError(format!(
                "rank table {}: HCCL takes only a rank table file whose name ends in .json",
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| {
            RankTableError(format!(
                "rank table {}: cannot read it: {e} (give the path of the JSON rank table with --rank-table or \
                 RANK_TABLE_FILE)",
                path.display()
            ))
        })?;
        RankTable::parse(&text, path)
    }

    /// [`RankTable::read`], waiting while the table's `status` is `"initializing"` (a launcher
    /// such as Ascend Operator writes the file while the job's pods start; HCCL itself waits
    /// for "completed"): re-read every `poll` until it is complete, or fail after `timeout`.
    /// `on_wait` is called once, when the waiting starts.
    pub fn read_when_ready(
        path: &Path,
        timeout: std::time::Duration,
        poll: std::time::Duration,
        on_wait: &mut dyn FnMut(),
    ) -> Result<RankTable, RankTableError> {
        let start = std::time::Instant::now();
        let mut waited = false;
        loop {
            let initializing = std::fs::read_to_string(path)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .is_some_and(|v| v.get("status").and_then(Value::as_str) == Some("initializing"));
            if !initializing {
                return RankTable::read(path);
            }
            if start.elapsed() >= timeout {
                return Err(RankTableError(format!(
                    "rank table {}: status: still \"initializing\" after {:.0} s (DSV4_COMM_TIMEOUT_S): whoever \
                     writes it (e.g. Ascend Operator) has not finished",
                    path.display(),
                    timeout.as_secs_f64()
                )));
            }
            if !waited {
                waited = true;
                on_wait();
            }
            std::thread::sleep(poll);
        }
    }

    /// Parses and validates `text`, the contents of `path` (named in the messages).
    pub fn parse(text: &str, path: &Path) -> Result<RankTable, RankTableError> {
        let file = path.display().to_string();
        let bad = |field: &str, msg: String| RankTableError(format!("rank table {file}: {field}: {msg}"));
        let root: Value = serde_json::from_str(text).map_err(|e| {
            RankTableError(format!(
                "rank table {file}: not valid JSON ({e}); note that the comments in Huawei's examples must be removed"
            ))
        })?;
        let Value::Object(top) = &root else {
            return Err(RankTableError(format!("rank table {file}: the top level is {}, not an object", shown(&root))));
        };
        if top.contains_key("group_list") || top.contains_key("server_group_list") {
            let which = if top.contains_key("group_list") { "group_list" } else { "server_group_list" };
            return Err(bad(
                which,
                "this is not the server_list template dsv4 reads (rank table version 1.0 or 1.2 with \
                 status, server_count and server_list)"
                    .into(),
            ));
        }
        let string = |key: &str| -> Result<&str, RankTableError> {
            match top.get(key) {
                Some(Value::String(s)) => Ok(s.as_str()),
                Some(v) => Err(bad(key, format!("{} is not a string", shown(v)))),
                None => Err(bad(key, "missing".into())),
            }
        };
        let status = string("status")?;
        if status != "completed" {
            return Err(bad(
                "status",
                format!(
                    "{status:?}, not \"completed\": the table is not ready to use (whoever writes it, e.g. Ascend \
                     Operator, has not finished)"
                ),
            ));
        }
        let version = string("version")?.to_string();
        if version != "1.0" && version != "1.2" {
            return Err(bad("version", format!("{version:?}: dsv4 reads rank tables of version \"1.0\" and \"1.2\"")));
        }
        let servers_v = match top.get("server_list") {
            Some(Value::Array(a)) if !a.is_empty() => a,
            Some(Value::Array(_)) => return Err(bad("server_list", "empty: the table lists no server".into())),
            Some(v) => return Err(bad("server_list", format!("{} is not a list", shown(v)))),
            None => return Err(bad("server_list", "missing".into())),
        };
        let count = match top.get("server_count") {
            Some(v) => number(v)
                .ok_or_else(|| bad("server_count", format!("{} is not a number written as a string", shown(v))))?,
            None => return Err(bad("server_count", "missing".into())),
        };
        if count as usize != servers_v.len() {
            return Err(bad("server_count", format!("{count}, but server_list lists {} server(s)", servers_v.len())));
        }
        let mut servers = Vec::with_capacity(servers_v.len());
        let mut ids: HashMap<String, usize> = HashMap::new();
        // rank → (server index, device index), to report a rank listed twice.
        let mut ranks: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
        for (i, s) in servers_v.iter().enumerate() {
            let at = format!("server_list[{i}]");
            let Value::Object(s) = s else {
                return Err(bad(&at, format!("{} is not an object", shown(s))));
            };
            let server_id = match s.get("server_id") {
                Some(Value::String(id)) if !id.trim().is_empty() => id.clone(),
                Some(v) => {
                    return Err(bad(&format!("{at}.server_id"), format!("{} is not a non-empty string", shown(v))))
                }
                None => return Err(bad(&format!("{at}.server_id"), "missing".into())),
            };
            if let Some(first) = ids.insert(server_id.clone(), i) {
                return Err(bad(
                    &format!("{at}.server_id"),
                    format!("{server_id:?} is also server_list[{first}]'s; server ids must be unique"),
                ));
            }
            let devices_v = match s.get("device") {
                Some(Value::Array(a)) if !a.is_empty() => a,
                Some(Value::Array(_)) => {
                    return Err(bad(&format!("{at}.device"), format!("server {server_id:?} lists no device")))
                }
                Some(v) => return Err(bad(&format!("{at}.device"), format!("{} is not a list", shown(v)))),
                None => return Err(bad(&format!("{at}.device"), format!("missing (server {server_id:?})"))),
            };
            let mut devices = Vec::with_capacity(devices_v.len());
            let mut seen: HashMap<u32, usize> = HashMap::new();
            for (j, d) in devices_v.iter().enumerate() {
                let at = format!("{at}.device[{j}]");
                let Value::Object(d) = d else {
                    return Err(bad(&at, format!("{} is not an object", shown(d))));
                };
                let field = |key: &str| -> Result<u64, RankTableError> {
                    match d.get(key) {
                        Some(v) => number(v).ok_or_else(|| {
                            bad(
                                &format!("{at}.{key}"),
                                format!(
                                    "{} is not a non-negative number written as a string (HCCL reads \"3\", not 3)",
                                    shown(v)
                                ),
                            )
                        }),
                        None => Err(bad(&format!("{at}.{key}"), format!("missing (server {server_id:?})"))),
                    }
                };
                let device_id = field("device_id")?;
                let device_id = u32::try_from(device_id)
                    .map_err(|_| bad(&format!("{at}.device_id"), format!("{device_id} is out of range")))?;
                let rank_id = field("rank_id")? as usize;
                if version == "1.2" {
                    match d.get("super_device_id") {
                        Some(v) if number(v).is_some() => {}
                        Some(v) => {
                            return Err(bad(
                                &format!("{at}.super_device_id"),
                                format!("{} is not a number written as a string", shown(v)),
                            ))
                        }
                        None => {
                            return Err(bad(
                                &format!("{at}.super_device_id"),
                                format!("missing (server {server_id:?}): a version 1.2 table gives every device's"),
                            ))
                        }
                    }
                }
                if let Some(first) = seen.insert(device_id, j) {
                    return Err(bad(
                        &format!("{at}.device_id"),
                        format!(
                            "device {device_id} of server {server_id:?} is listed twice ({at} and \
                             server_list[{i}].device[{first}]); one rank per device"
                        ),
                    ));
                }
                if let Some((si, dj)) = ranks.insert(rank_id, (i, j)) {
                    return Err(bad(
                        &format!("{at}.rank_id"),
                        format!("rank {rank_id} is also server_list[{si}].device[{dj}]'s; every rank exactly once"),
                    ));
                }
                devices.push(TableDevice { device_id, rank_id });
            }
            devices.sort_by_key(|d| d.rank_id);
            servers.push(TableServer { server_id, devices });
        }
        let world = ranks.len();
        if let Some((&rank, &(i, j))) = ranks.iter().find(|(&r, _)| r >= world) {
            let missing: Vec<usize> = (0..world).filter(|r| !ranks.contains_key(r)).collect();
            return Err(bad(
                &format!("server_list[{i}].device[{j}].rank_id"),
                format!(
                    "rank {rank} in a table of {world} device(s): rank ids must be 0..{world} each exactly once \
                     (missing: {missing:?})"
                ),
            ));
        }
        if version == "1.2" {
            if let Some(pods) = top.get("super_pod_list") {
                let Value::Array(pods) = pods else {
                    return Err(bad("super_pod_list", format!("{} is not a list", shown(pods))));
                };
                for (p, pod) in pods.iter().enumerate() {
                    let members = pod.get("server_list").and_then(Value::as_array);
                    let Some(members) = members else {
                        return Err(bad(&format!("super_pod_list[{p}].server_list"), "missing or not a list".into()));
                    };
                    for (k, m) in members.iter().enumerate() {
                        let at = format!("super_pod_list[{p}].server_list[{k}].server_id");
                        match m.get("server_id") {
                            Some(Value::String(id)) if ids.contains_key(id) => {}
                            Some(v) => return Err(bad(&at, format!("{} is not a server of server_list", shown(v)))),
                            None => return Err(bad(&at, "missing".into())),
                        }
                    }
                }
            }
        }
        let mut canonical: Vec<String> = servers_v.iter().map(self::canonical).collect();
        if let Some(pods) = top.get("super_pod_list") {
            canonical.push(format!("super_pod_list {}", self::canonical(pods)));
        }
        Ok(RankTable { path: path.to_path_buf(), version, servers, canonical })
    }

    /// The number of ranks the table describes.
    pub fn world(&self) -> usize {
        self.servers.iter().map(|s| s.devices.len()).sum()
    }

    /// A canonical text of the table (version, servers in order, each device's id and rank,
    /// then every field of each entry, network ones included): equal for two files that
    /// describe the same world, whatever their formatting or key order.
    pub fn fingerprint(&self) -> String {
        let mut out = format!("rank table version {}", self.version);
        for (i, s) in self.servers.iter().enumerate() {
            let devices: Vec<String> =
                s.devices.iter().map(|d| format!("rank {} on {}", d.rank_id, d.device_id)).collect();
            out.push_str(&format!("\nrank table server_list[{i}]: {:?}, {}", s.server_id, devices.join(", ")));
        }
        for (i, c) in self.canonical.iter().enumerate() {
            match self.servers.get(i) {
                Some(_) => out.push_str(&format!("\nrank table server_list[{i}] fields: {c}")),
                None => out.push_str(&format!("\nrank table {c}")),
            }
        }
        out
    }

    /// Checks the table against this process's run: node `node_rank` of `nnodes`, its local
    /// rank `r` on the NPU whose physical id is `devices[r]`. See the module docs for the rule.
    pub fn check_run(&self, nnodes: usize, node_rank: usize, devices: &[usize]) -> Result<(), RankTableError> {
        self.check_run_visible(nnodes, node_rank, devices, None)
    }

    /// [`RankTable::check_run`] where this process's device id i is physical NPU `visible[i]`
    /// (through `ASCEND_RT_VISIBLE_DEVICES` and, in a container, the runtime's renumbering): the
    /// advice then gives `--devices` as this process's ids, as the flag takes them.
    pub fn check_run_visible(
        &self,
        nnodes: usize,
        node_rank: usize,
        devices: &[usize],
        visible: Option<&[usize]>,
    ) -> Result<(), RankTableError> {
        let file = self.path.display();
        let d = devices.len();
        let flags = if nnodes > 1 { format!("--nnodes {nnodes}") } else { "one node (no --nnodes)".into() };
        if self.servers.len() != nnodes {
            return Err(RankTableError(format!(
                "rank table {file}: server_count: the table lists {} server(s) but the run has {flags}; server i of \
                 server_list is node i (--node-rank i), so give --nnodes {} (one dsv4 process per server)",
                self.servers.len(),
                self.servers.len()
            )));
        }
        for (i, s) in self.servers.iter().enumerate() {
            if s.devices.len() != d {
                return Err(RankTableError(format!(
                    "rank table {file}: server_list[{i}].device: server {:?} lists {} device(s) but this node runs \
                     {d} (--devices); dsv4 runs the same number of devices on every node",
                    s.server_id,
                    s.devices.len()
                )));
            }
            let ranks: Vec<usize> = s.devices.iter().map(|x| x.rank_id).collect();
            let want: Vec<usize> = (i * d..(i + 1) * d).collect();
            if ranks != want {
                return Err(RankTableError(format!(
                    "rank table {file}: server_list[{i}].device[].rank_id: server {:?} (node {i}) holds ranks \
                     {ranks:?}, but dsv4 runs node {i}'s devices as global ranks {}..{} (node R holds R·D..(R+1)·D); \
                     renumber the rank ids or reorder server_list",
                    s.server_id,
                    i * d,
                    (i + 1) * d
                )));
            }
        }
        let Some(me) = self.servers.get(node_rank) else {
            return Err(RankTableError(format!(
                "rank table {file}: server_list: node rank {node_rank} has no server (the table lists {})",
                self.servers.len()
            )));
        };
        let ids: Vec<usize> = me.devices.iter().map(|x| x.device_id as usize).collect();
        if ids != devices {
            let pos = ids.iter().zip(devices).position(|(a, b)| a != b).unwrap_or(0);
            // The flag takes logical ids: the table's physical ones mapped back through the
            // visible list, where there is one.
            let advice = match visible {
                None => format!("give --devices {}", ids.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")),
                Some(v) => match ids.iter().map(|p| v.iter().position(|x| x == p)).collect::<Option<Vec<_>>>() {
                    Some(logical) => format!(
                        "give --devices {} (this process's device ids, which are physical NPUs {v:?} in order)",
                        logical.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(","),
                    ),
                    None => format!(
                        "the table's NPUs are not all among this process's devices (physical NPUs {v:?}, through \
                         ASCEND_RT_VISIBLE_DEVICES or a container): make them visible, or fix the table"
                    ),
                },
            };
            return Err(RankTableError(format!(
                "rank table {file}: server_list[{node_rank}].device[].device_id: server {:?} (node {node_rank}) puts \
                 ranks {}..{} on physical NPUs {ids:?}, but --devices gives {devices:?} (rank {} on NPU {} here, {} \
                 in the table); {advice}",
                me.server_id,
                node_rank * d,
                (node_rank + 1) * d,
                node_rank * d + pos,
                devices[pos],
                ids[pos],
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(servers: &[(&str, &[(u32, usize)])]) -> String {
        let list: Vec<Value> = servers
            .iter()
            .map(|(id, devs)| {
                let devs: Vec<Value> = devs
                    .iter()
                    .map(|(d, r)| {
                        serde_json::json!({"device_id": d.to_string(), "device_ip": format!("192.168.1.{d}"),
                                           "rank_id": r.to_string()})
                    })
                    .collect();
                serde_json::json!({"server_id": id, "device": devs})
            })
            .collect();
        serde_json::json!({"status": "completed", "version": "1.0", "server_count": servers.len().to_string(),
                           "server_list": list})
        .to_string()
    }

    fn parse(text: &str) -> Result<RankTable, RankTableError> {
        RankTable::parse(text, Path::new("/etc/hccl.json"))
    }

    fn two_by_two() -> String {
        table(&[("node_0", &[(0, 0), (1, 1)]), ("node_1", &[(0, 2), (1, 3)])])
    }

    #[test]
    fn huaweis_two_server_example_parses() {
        let t = parse(&two_by_two()).unwrap();
        assert_eq!(t.version, "1.0");
        assert_eq!(t.world(), 4);
        assert_eq!(t.servers[1].server_id, "node_1");
        assert_eq!(
            t.servers[1].devices,
            vec![TableDevice { device_id: 0, rank_id: 2 }, TableDevice { device_id: 1, rank_id: 3 }]
        );
        t.check_run(2, 0, &[0, 1]).unwrap();
        t.check_run(2, 1, &[0, 1]).unwrap();
    }

    /// MindCluster's hccl.json (extra fields: container_ip, hardware_type; fields in another
    /// order), passed through; numbers written as JSON integers are refused, as HCCL refuses
    /// them.
    #[test]
    fn extra_fields_are_passed_through_and_integer_numbers_refused() {
        let ints = r#"{"server_list": [{"device": [{"device_id": 1, "device_ip": "192.168.101.1", "rank_id": 0}],
            "server_id": "a"}], "status": "completed", "server_count": "1", "version": "1.0"}"#;
        let e = parse(ints).unwrap_err().0;
        assert!(e.contains("server_list[0].device[0].device_id") && e.contains("written as a string"), "{e}");
        let text = r#"{"server_list": [{"device": [{"device_id": "1", "device_ip": "192.168.101.1", "rank_id": "0"},
            {"device_id": "3", "device_ip": "192.168.103.3", "rank_id": "1"}],
            "server_id": "192.168.101.101", "container_ip": "192.168.149.101", "hardware_type": "800I-A2-32G"}],
            "status": "completed", "server_count": "1", "version": "1.0"}"#;
        let t = parse(text).unwrap();
        t.check_run(1, 0, &[1, 3]).unwrap();
        let e = t.check_run(1, 0, &[0, 1]).unwrap_err().0;
        assert!(e.contains("server_list[0].device[].device_id") && e.contains("give --devices 1,3"), "{e}");
    }

    /// Devices listed out of rank order are taken in rank order.
    #[test]
    fn devices_are_taken_in_rank_order() {
        let t = parse(&table(&[("a", &[(5, 1), (4, 0)])])).unwrap();
        t.check_run(1, 0, &[4, 5]).unwrap();
        assert!(t.check_run(1, 0, &[5, 4]).is_err());
    }

    #[test]
    fn version_1_2_super_pods_are_read_through() {
        let mut v: Value = serde_json::from_str(&two_by_two()).unwrap();
        v["version"] = "1.2".into();
        v["server_list"][0]["device"][0]["super_device_id"] = "0".into();
        // HCCL's 1.2 parser needs every device's super_device_id.
        let e = parse(&v.to_string()).unwrap_err().0;
        assert!(e.contains("server_list[0].device[1].super_device_id") && e.contains("missing"), "{e}");
        for (i, j) in [(0, 1), (1, 0), (1, 1)] {
            v["server_list"][i]["device"][j]["super_device_id"] = format!("{}", 2 * i + j).into();
        }
        v["super_pod_list"] = serde_json::json!([{"super_pod_id": "0", "server_list": [{"server_id": "node_0"},
                                                                                      {"server_id": "node_1"}]}]);
        parse(&v.to_string()).unwrap().check_run(2, 1, &[0, 1]).unwrap();
        v["super_pod_list"][0]["server_list"][1]["server_id"] = "node_9".into();
        let e = parse(&v.to_string()).unwrap_err().0;
        assert!(e.contains("super_pod_list[0].server_list[1].server_id") && e.contains("node_9"), "{e}");
    }

    /// Each malformed case: the message names the file and the field.
    #[test]
    fn malformed_tables_are_refused_naming_the_field() {
        let good: Value = serde_json::from_str(&two_by_two()).unwrap();
        let edit = |f: &dyn Fn(&mut Value)| {
            let mut v = good.clone();
            f(&mut v);
            v.to_string()
        };
        let cases: Vec<(String, &[&str])> = vec![
            ("{not json".into(), &["not valid JSON"]),
            ("[1, 2]".into(), &["top level"]),
            (edit(&|v| v["status"] = "initializing".into()), &["status", "\"initializing\"", "not ready"]),
            (edit(&|v| drop(v.as_object_mut().unwrap().remove("status"))), &["status: missing"]),
            (edit(&|v| v["version"] = "2.0".into()), &["version", "\"2.0\""]),
            (edit(&|v| v["server_count"] = "3".into()), &["server_count", "3", "2 server(s)"]),
            (edit(&|v| v["server_count"] = "two".into()), &["server_count", "not a number"]),
            (edit(&|v| v["server_list"] = serde_json::json!([])), &["server_list: empty"]),
            (edit(&|v| v["server_list"][1]["server_id"] = "node_0".into()), &["server_list[1].server_id", "unique"]),
            (
                edit(&|v| drop(v["server_list"][0].as_object_mut().unwrap().remove("server_id"))),
                &["server_list[0].server_id: missing"],
            ),
            (
                edit(&|v| v["server_list"][1]["device"] = serde_json::json!([])),
                &["server_list[1].device", "\"node_1\""],
            ),
            (
                edit(&|v| v["server_list"][1]["device"][1]["device_id"] = "0".into()),
                &["server_list[1].device[1].device_id", "device 0 of server \"node_1\" is listed twice"],
            ),
            (
                edit(&|v| v["server_list"][1]["device"][0]["rank_id"] = "1".into()),
                &["server_list[1].device[0].rank_id", "rank 1 is also server_list[0].device[1]'s"],
            ),
            (
                edit(&|v| v["server_list"][1]["device"][1]["rank_id"] = "7".into()),
                &["server_list[1].device[1].rank_id", "rank 7", "missing: [3]"],
            ),
            (
                edit(&|v| v["server_list"][0]["device"][0]["rank_id"] = "-1".into()),
                &["server_list[0].device[0].rank_id", "not a non-negative number"],
            ),
            (
                edit(&|v| drop(v["server_list"][0]["device"][1].as_object_mut().unwrap().remove("device_id"))),
                &["server_list[0].device[1].device_id: missing"],
            ),
            (
                edit(&|v| v["server_list"][0]["device"][0]["device_id"] = serde_json::json!(1.5)),
                &["server_list[0].device[0].device_id"],
            ),
            (r#"{"status": "completed", "group_list": []}"#.into(), &["group_list", "not the server_list template"]),
        ];
        for (text, wants) in cases {
            let e = parse(&text).map(|_| ()).unwrap_err().0;
            assert!(e.starts_with("rank table /etc/hccl.json: "), "{e}");
            for w in wants {
                assert!(e.contains(w), "want {w:?} in: {e}");
            }
        }
    }

    /// The table against the run: --nnodes, the device count per node, the global-rank rule and
    /// this node's --devices.
    #[test]
    fn a_table_that_does_not_describe_the_run_is_refused() {
        let t = parse(&two_by_two()).unwrap();
        let e = t.check_run(1, 0, &[0, 1]).unwrap_err().0;
        assert!(e.contains("2 server(s)") && e.contains("give --nnodes 2"), "{e}");
        let e = t.check_run(2, 0, &[0, 1, 2]).unwrap_err().0;
        assert!(e.contains("server_list[0].device") && e.contains("lists 2 device(s)") && e.contains("runs 3"), "{e}");
        let e = t.check_run(2, 1, &[2, 3]).unwrap_err().0;
        assert!(e.contains("server_list[1].device[].device_id") && e.contains("\"node_1\""), "{e}");
        assert!(e.contains("rank 2 on NPU 2 here, 0 in the table") && e.contains("give --devices 0,1"), "{e}");
        // With ASCEND_RT_VISIBLE_DEVICES the advice is in logical ids, as --devices takes them.
        let t4 = parse(&table(&[("a", &[(4, 0), (5, 1)])])).unwrap();
        t4.check_run_visible(1, 0, &[4, 5], Some(&[4, 5])).unwrap();
        let e = t4.check_run_visible(1, 0, &[5, 4], Some(&[4, 5])).unwrap_err().0;
        assert!(e.contains("give --devices 0,1 (this process's device ids"), "{e}");
        let e = t4.check_run_visible(1, 0, &[6, 7], Some(&[6, 7])).unwrap_err().0;
        assert!(e.contains("not all among this process's devices"), "{e}");
        // Ranks not in dsv4's order: node 0 holds 0 and 2.
        let t = parse(&table(&[("a", &[(0, 0), (1, 2)]), ("b", &[(0, 1), (1, 3)])])).unwrap();
        let e = t.check_run(2, 0, &[0, 1]).unwrap_err().0;
        assert!(e.contains("server_list[0].device[].rank_id") && e.contains("holds ranks [0, 2]"), "{e}");
        assert!(e.contains("global ranks 0..2"), "{e}");
        // Uneven servers.
        let t = parse(&table(&[("a", &[(0, 0), (1, 1)]), ("b", &[(0, 2)])])).unwrap();
        let e = t.check_run(2, 1, &[0]).unwrap_err().0;
        assert!(e.contains("server_list[0].device") && e.contains("same number of devices"), "{e}");
    }

    /// Formatting and key order do not change a fingerprint; any field does, the network ones
    /// (which HCCL reads and dsv4 passes through) included.
    #[test]
    fn fingerprints_ignore_formatting_not_fields() {
        let a = parse(&two_by_two()).unwrap();
        let v: Value = serde_json::from_str(&two_by_two()).unwrap();
        // Pretty-printed.
        let b = RankTable::parse(&serde_json::to_string_pretty(&v).unwrap(), Path::new("/other.json")).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        let mut w = v.clone();
        w["server_list"][0]["device"][0]["device_ip"] = "10.0.0.1".into();
        assert_ne!(a.fingerprint(), parse(&w.to_string()).unwrap().fingerprint(), "a stale device_ip");
        let mut w = v.clone();
        w["server_list"][1]["device"][1]["device_id"] = "7".into();
        assert_ne!(a.fingerprint(), parse(&w.to_string()).unwrap().fingerprint());
        // Key order: the same entry with its keys the other way round.
        let mut m = serde_json::Map::new();
        let entry = v["server_list"][0].as_object().unwrap();
        for k in entry.keys().rev() {
            m.insert(k.clone(), entry[k].clone());
        }
        let mut w = v.clone();
        w["server_list"][0] = Value::Object(m);
        assert_eq!(a.fingerprint(), parse(&w.to_string()).unwrap().fingerprint());
    }

    /// A table still being written is waited for, up to the timeout.
    #[test]
    fn an_initializing_table_is_waited_for() {
        let dir = std::env::temp_dir().join(format!("dsv4-rank-table-wait-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hccl.json");
        std::fs::write(&path, two_by_two().replace("completed", "initializing")).unwrap();
        let (ms, poll) = (std::time::Duration::from_millis, std::time::Duration::from_millis(10));
        let mut waits = 0;
        let e = RankTable::read_when_ready(&path, ms(100), poll, &mut || waits += 1).unwrap_err().0;
        assert!(e.contains("still \"initializing\"") && e.contains("DSV4_COMM_TIMEOUT_S"), "{e}");
        assert_eq!(waits, 1);
        let writer = {
            let path = path.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(150));
                std::fs::write(&path, two_by_two()).unwrap();
            })
        };
        let t = RankTable::read_when_ready(&path, ms(10_000), poll, &mut || {}).unwrap();
        writer.join().unwrap();
        assert_eq!(t.world(), 4);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn only_json_files_are_read() {
        let e = RankTable::read(Path::new("/etc/hccl.txt")).unwrap_err().0;
        assert!(e.contains("ends in .json"), "{e}");
    }

    #[test]
    fn a_missing_file_is_named() {
        let e = RankTable::read(Path::new("/nonexistent/hccl.json")).unwrap_err().0;
        assert!(e.contains("/nonexistent/hccl.json") && e.contains("cannot read"), "{e}");
    }
}
