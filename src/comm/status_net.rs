//! [`Peers`] for ranks in separate processes, perhaps on other hosts: each rank serves its
//! status on a TCP port of its own, and a rank whose collective timed out connects to the others
//! with a short deadline. This side channel must not depend on MPI: the communication thread
//! that MPI allows to call it is the one that is stuck. A stopped process accepts the connection
//! (the kernel does that) but never answers, which is how a stalled rank shows.

use super::flight::{FlightRecorder, Status};
use super::watchdog::Peers;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// Where a rank serves its status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Advert {
    /// The rank.
    pub rank: usize,
    /// Its port.
    pub port: u16,
    /// Its IPv4 addresses, loopback last.
    pub ips: Vec<IpAddr>,
}

/// Starts this rank's status server and returns where it listens. The thread lives as long as
/// the process.
pub fn serve(rank: usize, recorder: Arc<FlightRecorder>) -> std::io::Result<Advert> {
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    let port = listener.local_addr()?.port();
    std::thread::Builder::new()
        .name(format!("kiln-status-{rank}"))
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut stream = stream;
                let text = serde_json::to_string(&recorder.status()).unwrap_or_default();
                let _ = stream.write_all(text.as_bytes());
            }
        })?;
    Ok(Advert {
        rank,
        port,
        ips: local_ipv4(),
    })
}

/// Every rank's advert, in rank order.
pub struct NetPeers {
    me: usize,
    recorder: Arc<FlightRecorder>,
    adverts: Vec<Advert>,
}

impl NetPeers {
    /// Peers from the adverts every rank sent (in rank order).
    pub fn new(me: usize, recorder: Arc<FlightRecorder>, adverts: Vec<Advert>) -> Self {
        NetPeers {
            me,
            recorder,
            adverts,
        }
    }
}

impl Peers for NetPeers {
    fn statuses(&self, wait: Duration) -> Vec<Option<Status>> {
        std::thread::scope(|s| {
            let asks: Vec<_> = self
                .adverts
                .iter()
                .map(|a| {
                    s.spawn(move || {
                        if a.rank == self.me {
                            Some(self.recorder.status())
                        } else {
                            ask(a, wait)
                        }
                    })
                })
                .collect();
            asks.into_iter().map(|h| h.join().ok().flatten()).collect()
        })
    }
}

/// Asks one rank, trying its addresses in order; `None` if none answers as that rank in time.
fn ask(advert: &Advert, wait: Duration) -> Option<Status> {
    for ip in &advert.ips {
        let addr = SocketAddr::new(*ip, advert.port);
        let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
            continue;
        };
        let _ = stream.set_read_timeout(Some(wait));
        let mut text = String::new();
        if stream.read_to_string(&mut text).is_err() {
            // Connected but silent: the process is there and stopped. Another address would
            // reach the same process.
            return None;
        }
        // A loopback address may reach another process's port on this host: check who answered.
        match serde_json::from_str::<Status>(&text) {
            Ok(status) if status.rank == advert.rank => return Some(status),
            _ => continue,
        }
    }
    None
}

/// This host's IPv4 addresses (in this network namespace), loopback last.
fn local_ipv4() -> Vec<IpAddr> {
    let mut ips = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we free below with freeifaddrs; we only
    // read it in between.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
    }
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr; its family says which struct it is.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if family == libc::AF_INET {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                ips.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    ips.sort_by_key(|ip| ip.is_loopback());
    ips.dedup();
    if ips.is_empty() {
        ips.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    ips
}
