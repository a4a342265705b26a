//! Packet captures with tcpdump inside the cluster's namespaces, to show what travels
//! on a wire (e.g. that a payload never crosses it in plaintext).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
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
    pub fn stop(self) -> Result<Vec<u8>> {
        Ok(self.stop_files()?.concat())
    }

    /// Stops the capture and returns what it saw: the raw bytes (to search for a
    /// payload) and every TCP segment, decoded (to tell what each connection carried).
    pub fn stop_decoded(self) -> Result<Wire> {
        let files = self.stop_files()?;
        let mut segments = Vec::new();
        for file in &files {
            segments.extend(tcp_segments(file)?);
        }
        Ok(Wire {
            bytes: files.concat(),
            segments,
        })
    }

    fn stop_files(mut self) -> Result<Vec<Vec<u8>>> {
        let mut files = Vec::new();
        for dump in &mut self.dumps {
            dump.settle();
            dump.terminate()?;
            let bytes = std::fs::read(&dump.file)
                .with_context(|| format!("read {}", dump.file.display()))?;
            files.push(bytes);
        }
        Ok(files)
    }
}

/// What a capture saw.
#[derive(Debug)]
pub struct Wire {
    /// The pcap files, one after the other.
    pub bytes: Vec<u8>,
    /// Every TCP segment of every interface (a packet seen on two interfaces is here
    /// twice).
    pub segments: Vec<Segment>,
}

/// A TCP segment on the wire.
#[derive(Clone, Debug)]
pub struct Segment {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub seq: u32,
    pub syn: bool,
    pub payload: Vec<u8>,
}

/// One direction of a TCP connection, reassembled from its segments.
#[derive(Clone, Debug)]
pub struct Stream {
    pub from: SocketAddr,
    pub to: SocketAddr,
    /// The bytes carried, in order, each once.
    pub bytes: Vec<u8>,
    /// Segments seen (retransmissions and copies from other interfaces included).
    pub segments: usize,
}

/// The byte streams of the connections `segments` belong to, one per direction, in
/// order. Each must have been captured from its SYN with no gap.
pub fn streams(segments: &[Segment]) -> Result<Vec<Stream>> {
    let mut by_direction: BTreeMap<(SocketAddr, SocketAddr), Vec<&Segment>> = BTreeMap::new();
    for segment in segments {
        by_direction
            .entry((segment.from, segment.to))
            .or_default()
            .push(segment);
    }
    let mut streams = Vec::new();
    for ((from, to), mut segments) in by_direction {
        let syns: BTreeSet<u32> = segments.iter().filter(|s| s.syn).map(|s| s.seq).collect();
        let isn = match syns.len() {
            1 => syns.into_iter().next().context("the SYN just counted")?,
            0 => bail!("{from} -> {to}: no SYN in the capture (opened before it started)"),
            n => bail!("{from} -> {to}: {n} connections on the same addresses and ports"),
        };
        let offset = |s: &Segment| s.seq.wrapping_sub(isn.wrapping_add(1)) as usize;
        segments.retain(|s| !s.payload.is_empty());
        segments.sort_by_key(|s| offset(s));
        let mut bytes = Vec::new();
        for segment in &segments {
            let start = offset(segment);
            if start > bytes.len() {
                bail!(
                    "{from} -> {to}: {} bytes missing from the capture at offset {}",
                    start - bytes.len(),
                    bytes.len()
                );
            }
            if let Some(new) = segment.payload.get(bytes.len() - start..) {
                bytes.extend_from_slice(new);
            }
        }
        streams.push(Stream {
            from,
            to,
            bytes,
            segments: segments.len(),
        });
    }
    Ok(streams)
}

/// A TLS record header: content type and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub content_type: u8,
    pub len: usize,
}

/// TLS record content types.
pub const HANDSHAKE: u8 = 22;
pub const APPLICATION_DATA: u8 = 23;
const CHANGE_CIPHER_SPEC: u8 = 20;
const ALERT: u8 = 21;
/// The largest record TLS allows (2^14 plus the expansion of an encrypted record).
const MAX_RECORD: usize = (1 << 14) + 256;

/// The TLS records that `bytes` consists of, every byte in one, or what is wrong (at
/// which offset).
pub fn tls_records(bytes: &[u8]) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let Some(header) = bytes.get(at..at + 5) else {
            bail!(
                "offset {at}: {} bytes, not a TLS record header",
                bytes.len() - at
            );
        };
        let content_type = header[0];
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if ![CHANGE_CIPHER_SPEC, ALERT, HANDSHAKE, APPLICATION_DATA].contains(&content_type) {
            bail!("offset {at}: content type {content_type} is not TLS");
        }
        if header[1] != 3 || header[2] > 3 {
            bail!(
                "offset {at}: version {}.{} is not TLS",
                header[1],
                header[2]
            );
        }
        if len > MAX_RECORD || at + 5 + len > bytes.len() {
            bail!(
                "offset {at}: a record of {len} bytes where {} remain",
                bytes.len() - at - 5
            );
        }
        records.push(Record { content_type, len });
        at += 5 + len;
    }
    Ok(records)
}

/// The handshake message type of the first record of a stream (1 ClientHello,
/// 2 ServerHello), if it is a handshake record.
pub fn first_handshake_type(bytes: &[u8]) -> Option<u8> {
    (bytes.first() == Some(&HANDSHAKE)).then(|| bytes.get(5).copied())?
}

const PCAP_MAGIC_MICROS: u32 = 0xa1b2_c3d4;
const PCAP_MAGIC_NANOS: u32 = 0xa1b2_3c4d;
const LINKTYPE_ETHERNET: u32 = 1;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const PROTOCOL_TCP: u8 = 6;

/// The TCP segments of a pcap file of an Ethernet interface (IPv4, and IPv6 without
/// extension headers); other packets are skipped.
pub fn tcp_segments(pcap: &[u8]) -> Result<Vec<Segment>> {
    let header = pcap
        .get(..24)
        .context("a pcap file shorter than its header")?;
    let magic = u32::from_le_bytes(header[..4].try_into()?);
    let little = match magic {
        PCAP_MAGIC_MICROS | PCAP_MAGIC_NANOS => true,
        _ if magic.swap_bytes() == PCAP_MAGIC_MICROS || magic.swap_bytes() == PCAP_MAGIC_NANOS => {
            false
        }
        _ => bail!("not a pcap file (magic {magic:#010x})"),
    };
    let word = |bytes: &[u8]| -> Result<u32> {
        let bytes: [u8; 4] = bytes.try_into()?;
        Ok(if little {
            u32::from_le_bytes(bytes)
        } else {
            u32::from_be_bytes(bytes)
        })
    };
    let link = word(&header[20..24])?;
    if link != LINKTYPE_ETHERNET {
        bail!("pcap link type {link}: only Ethernet (1) is decoded");
    }
    let mut segments = Vec::new();
    let mut at = 24;
    while at < pcap.len() {
        let record = pcap
            .get(at..at + 16)
            .with_context(|| format!("pcap record header cut at offset {at}"))?;
        let captured = word(&record[8..12])? as usize;
        let frame = pcap
            .get(at + 16..at + 16 + captured)
            .with_context(|| format!("pcap record cut at offset {at}"))?;
        if let Some(segment) = ethernet_tcp(frame) {
            segments.push(segment);
        }
        at += 16 + captured;
    }
    Ok(segments)
}

fn ethernet_tcp(frame: &[u8]) -> Option<Segment> {
    let ethertype = u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?);
    let ip = frame.get(14..)?;
    let (from, to, tcp) = match ethertype {
        ETHERTYPE_IPV4 => {
            let header_len = usize::from(ip.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes(ip.get(2..4)?.try_into().ok()?));
            if *ip.get(9)? != PROTOCOL_TCP {
                return None;
            }
            let from: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let to: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            (
                IpAddr::from(from),
                IpAddr::from(to),
                ip.get(header_len..total)?,
            )
        }
        ETHERTYPE_IPV6 => {
            let payload = usize::from(u16::from_be_bytes(ip.get(4..6)?.try_into().ok()?));
            if *ip.get(6)? != PROTOCOL_TCP {
                return None;
            }
            let from: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let to: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            (
                IpAddr::from(from),
                IpAddr::from(to),
                ip.get(40..40 + payload)?,
            )
        }
        _ => return None,
    };
    let port = |at: usize| Some(u16::from_be_bytes(tcp.get(at..at + 2)?.try_into().ok()?));
    let data_offset = usize::from(tcp.get(12)? >> 4) * 4;
    Some(Segment {
        from: SocketAddr::new(from, port(0)?),
        to: SocketAddr::new(to, port(2)?),
        seq: u32::from_be_bytes(tcp.get(4..8)?.try_into().ok()?),
        syn: tcp.get(13)? & 0x02 != 0,
        payload: tcp.get(data_offset..)?.to_vec(),
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(seq: u32, syn: bool, payload: &[u8]) -> Segment {
        Segment {
            from: "10.1.0.2:40000".parse().unwrap(),
            to: "10.2.0.2:15008".parse().unwrap(),
            seq,
            syn,
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn streams_are_reassembled_in_order_once_across_copies_and_wraparound() {
        let isn = u32::MAX - 2;
        let segments = [
            segment(isn.wrapping_add(6), false, b"world"),
            segment(isn, true, b""),
            segment(isn.wrapping_add(1), false, b"hello"),
            // The same packet seen on a second interface, and an overlapping resend.
            segment(isn.wrapping_add(1), false, b"hello"),
            segment(isn.wrapping_add(4), false, b"lowor"),
        ];
        let streams = streams(&segments).unwrap();
        assert_eq!(streams.len(), 1);
        assert_eq!(streams[0].bytes, b"helloworld");
    }

    #[test]
    fn a_stream_without_its_syn_or_with_a_gap_is_an_error() {
        let err = streams(&[segment(10, false, b"x")]).unwrap_err();
        assert!(err.to_string().contains("no SYN"), "{err}");
        let err = streams(&[segment(10, true, b""), segment(15, false, b"x")]).unwrap_err();
        assert!(err.to_string().contains("4 bytes missing"), "{err}");
    }

    #[test]
    fn tls_records_cover_every_byte_or_say_where_they_stop() {
        let mut bytes = vec![HANDSHAKE, 3, 1, 0, 2, 1, 0];
        bytes.extend([APPLICATION_DATA, 3, 3, 0, 3, 9, 9, 9]);
        let records = tls_records(&bytes).unwrap();
        assert_eq!(
            records,
            [
                Record {
                    content_type: HANDSHAKE,
                    len: 2
                },
                Record {
                    content_type: APPLICATION_DATA,
                    len: 3
                }
            ]
        );
        assert_eq!(first_handshake_type(&bytes), Some(1));
        let err = tls_records(b"POST /charge HTTP/1.1\r\n").unwrap_err();
        assert!(err.to_string().contains("content type 80"), "{err}");
        let err = tls_records(&bytes[..bytes.len() - 1]).unwrap_err();
        assert!(err.to_string().contains("offset 7"), "{err}");
    }

    #[test]
    fn a_file_that_is_not_pcap_is_an_error() {
        let err = tcp_segments(&[0u8; 24]).unwrap_err();
        assert!(err.to_string().contains("not a pcap file"), "{err}");
    }
}
