//! Hand-built Ethernet frames (TCP SYNs, UDP datagrams, truncated headers) and a packet socket
//! that sends them from inside a namespace, for the XDP guard's tests and benchmark.
//!
//! Frames go out through `AF_PACKET` on one veth, so their source address can be any address
//! (a flood "from one source" that is not a real host) and the sender is not slowed by its own
//! TCP stack. Nothing here leaves the namespaces the caller built.

use std::ffi::CString;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::netns::Netns;

pub type Mac = [u8; 6];

/// The MAC address of `dev` in namespace `ns` (from `ip -o link show`).
pub fn mac_of(ns: &Netns, dev: &str) -> Mac {
    let out = Command::new("ip")
        .args(["-n", ns.name(), "-o", "link", "show", "dev", dev])
        .output()
        .expect("run `ip -o link show`");
    let text = String::from_utf8_lossy(&out.stdout);
    let mac = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no link/ether address for {dev} in {}: {text}", ns.name()));
    let mut out = [0u8; 6];
    for (i, part) in mac.split(':').enumerate().take(6) {
        out[i] = u8::from_str_radix(part, 16).unwrap_or_else(|_| panic!("bad MAC {mac}"));
    }
    out
}

fn csum_add(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An L4 header plus payload (TCP or UDP), checksum field zeroed, at `csum_at`.
fn l4_with_checksum(
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    mut l4: Vec<u8>,
    csum_at: usize,
) -> Vec<u8> {
    let len = l4.len() as u32;
    let mut sum = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let s = csum_add(0, &s.octets());
            csum_add(s, &d.octets()) + u32::from(proto) + len
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let s = csum_add(0, &s.octets());
            csum_add(s, &d.octets()) + u32::from(proto) + (len >> 16) + (len & 0xffff)
        }
        _ => panic!("source and destination of one packet must be of one family"),
    };
    sum = csum_add(sum, &l4);
    let c = csum_fold(sum);
    l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
    l4
}

/// Ethernet + IP header + `l4` (already checksummed).
fn frame(src_mac: Mac, dst_mac: Mac, src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + 40 + l4.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            ip[6] = 0x40; // don't fragment
            ip[8] = 64;
            ip[9] = proto;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let c = csum_fold(csum_add(0, &ip));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend_from_slice(&0x86ddu16.to_be_bytes());
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
            ip[6] = proto;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            f.extend_from_slice(&ip);
        }
        _ => panic!("source and destination of one packet must be of one family"),
    }
    f.extend_from_slice(l4);
    f
}

/// A TCP SYN from `src:sport` to `dst:dport`.
pub fn syn_frame(
    src_mac: Mac,
    dst_mac: Mac,
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&(u32::from(sport) * 7919).to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let tcp = l4_with_checksum(src, dst, 6, tcp, 16);
    frame(src_mac, dst_mac, src, dst, 6, &tcp)
}

/// A UDP datagram with `payload`.
pub fn udp_frame(
    src_mac: Mac,
    dst_mac: Mac,
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut udp = vec![0u8; 8];
    udp[0..2].copy_from_slice(&sport.to_be_bytes());
    udp[2..4].copy_from_slice(&dport.to_be_bytes());
    udp[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(payload);
    let udp = l4_with_checksum(src, dst, 17, udp, 6);
    frame(src_mac, dst_mac, src, dst, 17, &udp)
}

/// An IPv4 frame that says TCP but ends 8 bytes into the TCP header (ports present, flags
/// missing): a truncated header the guard must pass and count.
pub fn truncated_tcp_frame(
    src_mac: Mac,
    dst_mac: Mac,
    src: IpAddr,
    dst: IpAddr,
    dport: u16,
) -> Vec<u8> {
    let mut tcp = vec![0u8; 8];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    frame(src_mac, dst_mac, src, dst, 6, &tcp)
}

/// A packet socket bound to one interface of a namespace.
pub struct FrameSender {
    fd: OwnedFd,
}

impl FrameSender {
    /// Opens `AF_PACKET` on `dev` inside `ns` (the socket keeps that namespace for life), with
    /// the qdisc bypassed so frames go straight to the driver.
    pub fn open(ns: &Netns, dev: &str) -> FrameSender {
        let dev = dev.to_owned();
        let fd = ns.exec(move || -> io::Result<OwnedFd> {
            let name =
                CString::new(dev).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            // SAFETY: if_nametoindex reads a NUL-terminated string.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if ifindex == 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: plain socket(2); the fd is owned right away.
            let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `raw` is a fresh fd nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = 0; // send only: receive nothing
            sll.sll_ifindex = ifindex as i32;
            // SAFETY: bind with a sockaddr_ll of the right size.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            let one: libc::c_int = 1;
            // SAFETY: setsockopt with an int option value. Best effort: without it frames still
            // go out, through the qdisc.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    libc::PACKET_QDISC_BYPASS,
                    &one as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as u32,
                );
            }
            Ok(fd)
        });
        FrameSender {
            fd: fd.unwrap_or_else(|e| panic!("open a packet socket in {}: {e}", ns.name())),
        }
    }

    /// Sends one frame.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: send(2) reads `frame` for its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends as many of `frames` as one sendmmsg(2) takes; returns how many went out.
    pub fn send_batch(&self, frames: &[Vec<u8>]) -> io::Result<usize> {
        let mut iovs: Vec<libc::iovec> = frames
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .map(|iov| {
                // SAFETY: mmsghdr is plain data; zeroed is a valid start.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: every mmsghdr points at one iovec that points into a live frame.
        let n =
            unsafe { libc::sendmmsg(self.fd.as_raw_fd(), msgs.as_mut_ptr(), msgs.len() as u32, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Sends `frames` round-robin, `per_tick` frames every `tick`, until `total` went out (bounded
    /// by `limit`); returns (frames sent, time taken). Pacing keeps the receiving veth's queue
    /// from overflowing, so every frame sent reaches the program.
    pub fn paced(
        &self,
        frames: &[Vec<u8>],
        total: usize,
        per_tick: usize,
        tick: Duration,
        limit: Duration,
    ) -> (usize, Duration) {
        let start = Instant::now();
        let mut sent = 0;
        let mut next = start;
        while sent < total && start.elapsed() < limit {
            for _ in 0..per_tick.min(total - sent) {
                if self.send(&frames[sent % frames.len()]).is_ok() {
                    sent += 1;
                }
            }
            next += tick;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
        }
        (sent, start.elapsed())
    }
}
