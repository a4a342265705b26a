//! Packet captures with tcpdump inside the cluster's namespaces, to show what travels
//! on a wire (e.g. that a payload never crosses it in plaintext).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Running tcpdumps, one per interface, writing full packets to files; stopped (and
/// the files removed) on drop. One process per named interface rather than one on
/// `any`, which was seen to miss packets of forwarded flows.
#[derive(Debug)]
pub struct Capture {
    dumps: Vec<Dump>,
    dir: tempfile::TempDir,
}

#[derive(Debug)]
struct Dump {
    interface: String,
    child: Child,
    file: PathBuf,
}

impl Capture {
    /// Starts one `tcpdump` per interface (`tcpdump()` makes the command, prefixed to run
    /// in the right namespace) and waits until each listens.
    pub(crate) fn start(
        tcpdump: impl Fn() -> Command,
        interfaces: impl IntoIterator<Item = String>,
    ) -> Result<Capture> {
        let dir = tempfile::tempdir().context("capture directory")?;
        let mut capture = Capture {
            dumps: Vec::new(),
            dir,
        };
        for interface in interfaces {
            let file = capture.dir.path().join(format!("{interface}.pcap"));
            let child = tcpdump()
                .args([
                    "-i",
                    &interface,
                    "-s",
                    "0",
                    "-U",
                    "--immediate-mode",
                    "-n",
                    "-w",
                ])
                .arg(&file)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .context("cannot start tcpdump (cargo xtask setup installs it)")?;
            capture.dumps.push(Dump {
                interface,
                child,
                file,
            });
            let dump = capture.dumps.last_mut().context("the dump just added")?;
            dump.wait_listening()?;
        }
        Ok(capture)
    }

    /// Stops the capture and returns the packets of every interface (pcap files one
    /// after the other: enough to search for a payload).
    pub fn stop(mut self) -> Result<Vec<u8>> {
        let mut packets = Vec::new();
        for dump in &mut self.dumps {
            dump.settle();
            dump.terminate()?;
            let bytes = std::fs::read(&dump.file)
                .with_context(|| format!("read {}", dump.file.display()))?;
            packets.extend(bytes);
        }
        Ok(packets)
    }
}

impl Dump {
    fn wait_listening(&mut self) -> Result<()> {
        let stderr = self.child.stderr.take().context("tcpdump stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("listening on") => break,
                Some(Ok(_)) => {}
                Some(Err(err)) => bail!("tcpdump on {}: {err}", self.interface),
                None => {
                    let status = self.child.wait()?;
                    bail!(
                        "tcpdump on {} stopped before listening: {status}",
                        self.interface
                    );
                }
            }
        }
        // Keep draining tcpdump's messages so it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Ok(())
    }

    /// Gives tcpdump the time to write what the kernel captured: waits until the file
    /// stops growing (checked every 100 ms, 2 s at most).
    fn settle(&self) {
        let size = || std::fs::metadata(&self.file).map(|m| m.len()).unwrap_or(0);
        let mut last = size();
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(100));
            let now = size();
            if now == last {
                return;
            }
            last = now;
        }
    }

    fn terminate(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_none() {
            let pid = i32::try_from(self.child.id()).context("tcpdump pid")?;
            kill(Pid::from_raw(pid), Signal::SIGTERM).context("stop tcpdump")?;
            self.child.wait()?;
        }
        Ok(())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        for dump in &mut self.dumps {
            if let Err(err) = dump.terminate() {
                eprintln!("cannot stop tcpdump on {}: {err:#}", dump.interface);
            }
        }
    }
}

/// Whether `needle` occurs in `haystack` (a payload marker in captured packets).
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|window| window == needle)
}
