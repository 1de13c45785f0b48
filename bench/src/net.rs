//! What many loopback connections need from the OS.
//!
//! - **File descriptors**: one per connection in this process (and one per connection in
//!   the server). [`raise_nofile`] lifts the soft limit to the hard limit, and the hard
//!   limit too when running as root (up to `fs.nr_open`).
//! - **Source ports**: every connection to the one server address needs its own
//!   (source address, source port). One source address has `net.ipv4.ip_local_port_range`
//!   ports (about 28k by default), so past ~20k connections the generator spreads them
//!   over 127.0.0.1 ..= 127.0.0.N (all of 127.0.0.0/8 is loopback on Linux, no setup
//!   needed). `IP_BIND_ADDRESS_NO_PORT` defers the port choice to `connect`, so ports are
//!   shared across destinations and `tcp_tw_reuse` (on for loopback by default) applies
//!   during connect/disconnect storms.

use std::os::fd::AsRawFd;

use tokio::net::TcpSocket;

/// The file-descriptor limit after trying to raise it to `want`: (soft, hard).
pub fn raise_nofile(want: u64) -> (u64, u64) {
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return (0, 0);
        }
        if lim.rlim_cur >= want {
            return (lim.rlim_cur, lim.rlim_max);
        }
        if lim.rlim_max < want {
            // Raising the hard limit needs CAP_SYS_RESOURCE (root); try, ignore failure.
            let raised = libc::rlimit {
                rlim_cur: want,
                rlim_max: want,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return (want, want);
            }
        }
        let soft = libc::rlimit {
            rlim_cur: want.min(lim.rlim_max),
            rlim_max: lim.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &soft) == 0 {
            return (soft.rlim_cur, soft.rlim_max);
        }
        (lim.rlim_cur, lim.rlim_max)
    }
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` so that binding a source address does not reserve a
/// port until `connect` (best effort: older kernels ignore it).
pub fn bind_address_no_port(socket: &TcpSocket) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a valid fd with a pointer to a c_int and its size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Connections per source address before the generator spreads them by default.
pub const CONNECTIONS_PER_SOURCE_IP: usize = 20_000;

/// How many source addresses `connections` simultaneous connections need.
pub fn source_ips_for(connections: usize) -> u8 {
    connections
        .div_ceil(CONNECTIONS_PER_SOURCE_IP)
        .clamp(1, 250) as u8
}
