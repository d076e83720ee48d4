//! Running an external engine's command: in its own process group, marked so that every
//! process it starts can be found again (one that left the group and its parent too),
//! its output kept in a log of bounded size, under a time limit, with interrupts passed on.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// The environment variable that marks an engine run's processes. Every process the
/// engine starts inherits it, whatever group, session or parent it ends up in.
const MARKER_VAR: &str = "RESBISECT_ENGINE_RUN";

/// Bytes of an engine's output the log keeps from its start, and from its end: a
/// runaway engine printing without end cannot fill the disk, and the log still ends with
/// the lines that say why it stopped.
const LOG_HEAD_BYTES: usize = 32 << 20;
const LOG_TAIL_BYTES: usize = 1 << 20;

/// How long the log's writer may go on draining output after the engine exited: output
/// a process it left running still holds open is not waited for.
const LOG_DRAIN: Duration = Duration::from_millis(500);

/// Run `command` with `sh -c` in its own process group, stdin closed, stdout and stderr
/// into `log` (bounded: [`LOG_HEAD_BYTES`] from the start, [`LOG_TAIL_BYTES`] from the
/// end), for at most `limit`. Returns the exit status, or `None` when it outlasted the
/// limit and it and every process it started were killed. Errors: the command cannot
/// start (bad input, exit 2), or waiting for it fails (engine failure).
pub(super) fn run(command: &str, log: &Path, limit: Option<Duration>) -> Result<Option<ExitStatus>> {
    let log_file = std::fs::File::create(log).map_err(|e| Error::io(log, e))?;
    let (reader, writer) =
        std::io::pipe().map_err(|e| Error::engine(format!("a pipe for the engine's output: {e}")))?;
    let writer_too = writer
        .try_clone()
        .map_err(|e| Error::engine(format!("a pipe for the engine's output: {e}")))?;
    let marker = new_marker();
    // Its own process group, so that a hung engine can be killed with every process it
    // started (a shell's children outlive the shell); resbisect passes interrupts on.
    // No terminal input: a background group reading it would stop, not fail.
    let spawned = Command::new("sh")
        .arg("-c")
        .arg(command)
        .env(MARKER_VAR, &marker)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer_too)
        .process_group(0)
        .spawn();
    let child = spawned.map_err(|e| Error::input(format!("cannot start the engine command: {e}")))?;
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        copy_bounded(reader, log_file);
        let _ = done_tx.send(());
    });
    let outcome = wait_at_most(child, limit, &marker);
    // The writer ends at the output's end, which comes when the last process holding it
    // ends; a process the engine left running may hold it long after.
    let _ = done_rx.recv_timeout(LOG_DRAIN);
    outcome
}

/// A marker no other run of this or another resbisect process shares.
fn new_marker() -> String {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}-{}-{nanos}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    )
}

/// Copy `from` into `to` until the end, keeping the first [`LOG_HEAD_BYTES`] and the
/// last [`LOG_TAIL_BYTES`], with a line in between that counts what was left out.
fn copy_bounded(mut from: impl Read, mut to: std::fs::File) {
    let mut buf = vec![0u8; 64 << 10];
    let mut head = 0usize;
    let mut tail: std::collections::VecDeque<u8> = std::collections::VecDeque::new();
    let mut dropped = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut chunk = &buf[..n];
        if head < LOG_HEAD_BYTES {
            let take = chunk.len().min(LOG_HEAD_BYTES - head);
            if to.write_all(&chunk[..take]).is_err() {
                return;
            }
            head += take;
            chunk = &chunk[take..];
        }
        tail.extend(chunk);
        let over = tail.len().saturating_sub(LOG_TAIL_BYTES);
        tail.drain(..over);
        dropped += over as u64;
    }
    if dropped > 0 {
        let _ = writeln!(
            to,
            "\n[resbisect: {dropped} bytes of the engine's output left out here]"
        );
    }
    let (a, b) = tail.as_slices();
    let _ = to.write_all(a).and_then(|()| to.write_all(b));
}

/// Process groups of engines running in their own (at most one per engine of a pair, and
/// a spare), which an interrupt of resbisect must still reach.
static ENGINE_GROUPS: [AtomicI32; 3] = [AtomicI32::new(0), AtomicI32::new(0), AtomicI32::new(0)];

/// SIGINT, SIGTERM or SIGHUP while engines run in their own process groups: pass it on to
/// them, as the terminal would have, then end as the default action does.
extern "C" fn forward_signal(signal: libc::c_int) {
    for group in &ENGINE_GROUPS {
        let pgid = group.load(Ordering::SeqCst);
        if pgid > 0 {
            // SAFETY: kill is async-signal-safe.
            unsafe { libc::kill(-pgid, signal) };
        }
    }
    // SAFETY: signal and raise are async-signal-safe; the default action ends the process.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
}

/// Wait for `child`, the leader of its own process group, for at most `limit` (no limit:
/// `None`): its exit status, or `None` once it and every process it started (found
/// below it or by `marker`) have been killed for outlasting it.
fn wait_at_most(mut child: Child, limit: Option<Duration>, marker: &str) -> Result<Option<ExitStatus>> {
    static FORWARDING: std::sync::Once = std::sync::Once::new();
    FORWARDING.call_once(|| {
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: installs a handler that only calls async-signal-safe functions.
            unsafe { libc::signal(signal, forward_signal as *const () as libc::sighandler_t) };
        }
    });
    let pgid = child.id() as i32;
    let slot = ENGINE_GROUPS
        .iter()
        .find(|g| g.compare_exchange(0, pgid, Ordering::SeqCst, Ordering::SeqCst).is_ok());
    // A limit past what the clock can count (`--engine-timeout 300000000000y`) is none.
    let deadline = limit.and_then(|l| Instant::now().checked_add(l));
    let mut pause = Duration::from_millis(1);
    let outcome = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(Some(status)),
            Ok(None) if deadline.is_some_and(|d| Instant::now() >= d) => {
                kill_tree(pgid, marker);
                let _ = child.wait();
                break Ok(None);
            }
            Ok(None) => {
                let left = deadline.map_or(pause, |d| d.saturating_duration_since(Instant::now()));
                std::thread::sleep(pause.min(left));
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(e) => break Err(Error::engine(format!("waiting for the engine command: {e}"))),
        }
    };
    if let Some(slot) = slot {
        slot.store(0, Ordering::SeqCst);
    }
    outcome
}

/// Kill the engine's process group, every process below its leader that left the group
/// (`setsid`, a daemon's own group), and every process carrying its `marker` (one whose
/// parent exited, as `setsid -f` and daemons do, now belongs to another). All are stopped
/// first, until no new one appears, and only then killed: a killed parent's children
/// move to another parent at once, out of reach of a search below the leader.
fn kill_tree(pgid: i32, marker: &str) {
    // SAFETY (each kill): signals the engine's own process group and the processes found
    // below its leader or carrying its marker, nothing of resbisect's.
    unsafe { libc::kill(-pgid, libc::SIGSTOP) };
    let mut tree: Vec<i32> = Vec::new();
    // A process forks no more once stopped; a few rounds reach those forked meanwhile.
    for _ in 0..8 {
        let mut found = descendants(pgid);
        found.extend(marked(marker));
        let new: Vec<i32> = found.into_iter().filter(|p| !tree.contains(p)).collect();
        if new.is_empty() {
            break;
        }
        for &pid in &new {
            unsafe { libc::kill(pid, libc::SIGSTOP) };
        }
        tree.extend(new);
    }
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    for &pid in &tree {
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// The processes /proc lists now (none where there is no /proc), with their parents.
fn processes() -> Vec<(i32, std::path::PathBuf)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| Some((entry.file_name().to_str()?.parse().ok()?, entry.path())))
        .collect()
}

/// The processes below `pid` (its children, theirs, and so on).
fn descendants(pid: i32) -> Vec<i32> {
    let parents: Vec<(i32, i32)> = processes()
        .into_iter()
        .filter_map(|(child, dir)| {
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            // Field 2, the command name, may hold spaces and parentheses: the state and
            // the parent's pid follow its last ')'.
            let parent = stat[stat.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()?;
            Some((child, parent))
        })
        .collect();
    let mut found = vec![pid];
    let mut next = 0;
    while next < found.len() {
        let parent = found[next];
        found.extend(parents.iter().filter(|&&(_, p)| p == parent).map(|&(c, _)| c));
        next += 1;
    }
    found.split_off(1)
}

/// The processes whose environment holds `MARKER_VAR=marker` (readable for this user's
/// processes, which an engine's are).
fn marked(marker: &str) -> Vec<i32> {
    let needle = format!("{MARKER_VAR}={marker}");
    processes()
        .into_iter()
        .filter(|(_, dir)| {
            std::fs::read(dir.join("environ")).is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == needle.as_bytes()))
        })
        .map(|(pid, _)| pid)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_keeps_its_head_and_tail_and_counts_what_it_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("a.log");
        let total = LOG_HEAD_BYTES + 3 * LOG_TAIL_BYTES;
        let mut output: Vec<u8> = (0..total).map(|i| b'a' + (i % 26) as u8).collect();
        output.extend_from_slice(b"\nthe last line\n");
        copy_bounded(&output[..], std::fs::File::create(&log).unwrap());
        let kept = std::fs::read(&log).unwrap();
        let note = format!(
            "\n[resbisect: {} bytes of the engine's output left out here]\n",
            output.len() - LOG_HEAD_BYTES - LOG_TAIL_BYTES
        );
        assert_eq!(kept.len(), LOG_HEAD_BYTES + note.len() + LOG_TAIL_BYTES);
        assert_eq!(&kept[..LOG_HEAD_BYTES], &output[..LOG_HEAD_BYTES]);
        assert_eq!(&kept[LOG_HEAD_BYTES..LOG_HEAD_BYTES + note.len()], note.as_bytes());
        assert_eq!(
            &kept[kept.len() - LOG_TAIL_BYTES..],
            &output[output.len() - LOG_TAIL_BYTES..]
        );
        // Output under the bound is kept whole, with no note.
        copy_bounded(&b"short\n"[..], std::fs::File::create(&log).unwrap());
        assert_eq!(std::fs::read(&log).unwrap(), b"short\n");
    }
}
