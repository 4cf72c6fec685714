//! `tcprelay LISTEN FORWARD`: the lab's TCP relay beside the gateway, for
//! networks that block UDP. Accepts TCP connections on LISTEN (the gateway's
//! address, port 443) and forwards the datagrams framed in each to FORWARD
//! (wireguard-go's UDP port), one UDP socket per connection, with Mullvad's
//! udp-over-tcp `tcp2udp`: the same framing sessiond's `Udp2Tcp` speaks.
//!
//! It owns nothing but its sockets; it never looks inside the datagrams
//! (they are WireGuard's, encrypted end to end).

use std::net::SocketAddr;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (listen, forward) = match args.as_slice() {
        [listen, forward] => match (listen.parse::<SocketAddr>(), forward.parse::<SocketAddr>()) {
            (Ok(l), Ok(f)) => (l, f),
            _ => {
                eprintln!("tcprelay: LISTEN and FORWARD must be ADDRESS:PORT");
                return ExitCode::from(2);
            }
        },
        _ => {
            eprintln!("usage: tcprelay LISTEN_ADDR:PORT FORWARD_ADDR:PORT");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tcprelay: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut options = udp_over_tcp::tcp2udp::Options::new(vec![listen], forward);
    // Datagrams are a call's media: no Nagle delay on the way back either.
    options.tcp_options.nodelay = true;
    eprintln!("tcprelay: listening on {listen}/tcp, forwarding to {forward}/udp");
    match runtime.block_on(udp_over_tcp::tcp2udp::run(options)) {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("tcprelay: {e}");
            ExitCode::FAILURE
        }
    }
}
