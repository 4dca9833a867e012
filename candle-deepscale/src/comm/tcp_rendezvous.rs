//! A small TCP rendezvous for processes started by torchrun or the `deepspeed` launcher outside
//! MPI (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` in the environment): rank 0 listens,
//! every other rank connects and receives rank 0's payload (the NCCL unique id). This is the
//! ordinary NCCL bootstrap, the job torch's `TCPStore` does for `init_process_group("nccl")`.
//!
//! The port is `MASTER_PORT + 1` ([`RENDEZVOUS_PORT_OFFSET`]) unless `DEEPSCALE_RENDEZVOUS_PORT`
//! names one: torchrun's agent already listens on `MASTER_PORT` itself (its own TCPStore).
//!
//! Written here rather than taken from a crate: no maintained crate does a one-shot "broadcast
//! 128 bytes from a listener" (the c10d store protocol is torch's private wire format); the
//! whole exchange is one hello and one reply per rank.
//!
//! Wire format, all integers little-endian u64: a rank sends `MAGIC, world_size, rank`; rank 0
//! answers `MAGIC, world_size`, then the payload length and the payload — or, when the hello
//! disagrees with its own world (another size, a rank out of range or seen twice), a length of
//! `u64::MAX` followed by a UTF-8 reason, so both sides fail naming it.
use candle_core::{bail, Error, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The rendezvous listens on `MASTER_PORT` plus this.
pub const RENDEZVOUS_PORT_OFFSET: u16 = 1;
const MAGIC: u64 = u64::from_le_bytes(*b"dsrdzv01");
const REFUSED: u64 = u64::MAX;

/// Where the rendezvous of a torchrun-style world happens, from its environment: `MASTER_ADDR`
/// (default `127.0.0.1`, as torchrun's `--standalone`) and `MASTER_PORT + 1`, or
/// `DEEPSCALE_RENDEZVOUS_PORT`.
pub fn address_from_env() -> Result<(String, u16)> {
    let host = std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
    if let Ok(p) = std::env::var("DEEPSCALE_RENDEZVOUS_PORT") {
        return match p.parse::<u16>() {
            Ok(p) if p > 0 => Ok((host, p)),
            _ => bail!("DEEPSCALE_RENDEZVOUS_PORT={p} is not a TCP port (1-65535)"),
        };
    }
    let Ok(p) = std::env::var("MASTER_PORT") else {
        bail!(
            "the NCCL rendezvous needs MASTER_PORT (torchrun and the deepspeed launcher set it) \
             or DEEPSCALE_RENDEZVOUS_PORT"
        )
    };
    match p.parse::<u16>() {
        Ok(p) if p > 0 && p < u16::MAX => Ok((host, p + RENDEZVOUS_PORT_OFFSET)),
        _ => bail!("MASTER_PORT={p} is not a TCP port below 65535"),
    }
}

/// Rank 0 sends `payload` (which only it passes) to every rank of `world_size`; every rank
/// returns it. Fails, naming what is wrong, when a rank does not arrive by `timeout`, when
/// ranks disagree on the world size, or when a rank number is out of range or taken twice.
pub fn exchange(
    host: &str,
    port: u16,
    rank: usize,
    world_size: usize,
    payload: Option<&[u8]>,
    timeout: Duration,
) -> Result<Vec<u8>> {
    if rank >= world_size {
        bail!("rendezvous: RANK={rank} is not below WORLD_SIZE={world_size}")
    }
    let deadline = Instant::now() + timeout;
    match (rank, payload) {
        (0, Some(p)) => serve(host, port, world_size, p, deadline).map(|_| p.to_vec()),
        (0, None) => bail!("rendezvous: rank 0 must bring the payload"),
        (_, _) => join(host, port, rank, world_size, deadline),
    }
}

fn io_err(what: String) -> impl Fn(std::io::Error) -> Error {
    move |e| Error::Msg(format!("rendezvous: {what}: {e}"))
}

fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(io_err(format!("MASTER_ADDR {host}")))?
        .collect();
    if addrs.is_empty() {
        bail!("rendezvous: MASTER_ADDR {host} resolves to no address")
    }
    Ok(addrs)
}

fn serve(host: &str, port: u16, n: usize, payload: &[u8], deadline: Instant) -> Result<()> {
    // Listen on every interface at the port: MASTER_ADDR is how the others reach this host,
    // which need not be an address this host can bind (NAT, a DNS alias).
    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(_) => TcpListener::bind(resolve(host, port)?.as_slice())
            .map_err(io_err(format!("listening on port {port}")))?,
    };
    listener
        .set_nonblocking(true)
        .map_err(io_err("listener".into()))?;
    let mut seen = vec![false; n];
    seen[0] = true;
    let mut waiting = n - 1;
    while waiting > 0 {
        match listener.accept() {
            Ok((mut s, peer)) => {
                s.set_nonblocking(false)
                    .and_then(|_| s.set_read_timeout(Some(left(deadline))))
                    .and_then(|_| s.set_write_timeout(Some(left(deadline))))
                    .map_err(io_err(format!("connection from {peer}")))?;
                // Something else knocked at the port (a health check, a scanner): ignore it.
                let Ok([MAGIC, size, r]) = read_u64s::<3>(&mut s) else {
                    continue;
                };
                let refusal = if size != n as u64 {
                    Some(format!(
                        "a rank at {peer} has WORLD_SIZE={size}, rank 0 has {n}"
                    ))
                } else if r == 0 || r >= n as u64 {
                    Some(format!(
                        "a rank at {peer} says RANK={r}; expected 1..{}",
                        n - 1
                    ))
                } else if seen[r as usize] {
                    Some(format!("RANK={r} arrived twice (again from {peer})"))
                } else {
                    seen[r as usize] = true;
                    None
                };
                let mut reply = Vec::with_capacity(24 + payload.len());
                reply.extend(MAGIC.to_le_bytes());
                reply.extend((n as u64).to_le_bytes());
                match &refusal {
                    Some(why) => {
                        reply.extend(REFUSED.to_le_bytes());
                        reply.extend(why.as_bytes());
                    }
                    None => {
                        reply.extend((payload.len() as u64).to_le_bytes());
                        reply.extend(payload);
                    }
                }
                let sent = s.write_all(&reply).and_then(|_| s.flush());
                if let Some(why) = refusal {
                    bail!("rendezvous: {why}")
                }
                sent.map_err(io_err(format!("sending to {peer}")))?;
                waiting -= 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let missing: Vec<usize> = (1..n).filter(|&r| !seen[r]).collect();
                    bail!(
                        "rendezvous on port {port}: rank(s) {missing:?} of {n} did not arrive in time"
                    )
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(io_err(format!("accepting on port {port}"))(e)),
        }
    }
    Ok(())
}

fn join(host: &str, port: u16, rank: usize, n: usize, deadline: Instant) -> Result<Vec<u8>> {
    let addrs = resolve(host, port)?;
    // Rank 0 may not be listening yet: retry until the deadline.
    let mut s = loop {
        let attempt = addrs
            .iter()
            .find_map(|a| TcpStream::connect_timeout(a, Duration::from_secs(2)).ok());
        match attempt {
            Some(s) => break s,
            None if Instant::now() > deadline => bail!(
                "rendezvous: rank {rank} could not reach rank 0 at {host}:{port} in time \
                 (is rank 0 running, and is MASTER_ADDR an address of its host?)"
            ),
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let what = format!("rank {rank} talking to {host}:{port}");
    s.set_read_timeout(Some(left(deadline)))
        .and_then(|_| s.set_write_timeout(Some(left(deadline))))
        .map_err(io_err(what.clone()))?;
    let mut hello = Vec::with_capacity(24);
    for v in [MAGIC, n as u64, rank as u64] {
        hello.extend(v.to_le_bytes());
    }
    s.write_all(&hello).map_err(io_err(what.clone()))?;
    let [magic, size, len] = read_u64s::<3>(&mut s).map_err(io_err(what.clone()))?;
    if magic != MAGIC {
        bail!("rendezvous: {host}:{port} is not a DeepScale rendezvous (another service?)")
    }
    if len == REFUSED {
        let mut why = String::new();
        s.read_to_string(&mut why).map_err(io_err(what))?;
        bail!("rendezvous: rank 0 refused rank {rank}: {why}")
    }
    if size != n as u64 {
        bail!("rendezvous: rank 0 has WORLD_SIZE={size}, rank {rank} has {n}")
    }
    if len > 1 << 20 {
        bail!("rendezvous: rank 0 announced a {len}-byte payload")
    }
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).map_err(io_err(what))?;
    Ok(payload)
}

fn left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

fn read_u64s<const K: usize>(s: &mut TcpStream) -> std::io::Result<[u64; K]> {
    let mut out = [0u64; K];
    for v in out.iter_mut() {
        let mut b = [0u8; 8];
        s.read_exact(&mut b)?;
        *v = u64::from_le_bytes(b);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn threads_receive_rank_zeros_payload() {
        let port = free_port();
        let t = Duration::from_secs(20);
        let peers: Vec<_> = (1..4)
            .map(|r| std::thread::spawn(move || exchange("127.0.0.1", port, r, 4, None, t)))
            .collect();
        let id: Vec<u8> = (0..128).map(|i| i as u8 ^ 0x5a).collect();
        assert_eq!(exchange("127.0.0.1", port, 0, 4, Some(&id), t).unwrap(), id);
        for p in peers {
            assert_eq!(p.join().unwrap().unwrap(), id);
        }
    }

    #[test]
    fn disagreements_and_absences_are_named() {
        let port = free_port();
        let t = Duration::from_secs(20);
        let peer = std::thread::spawn(move || exchange("127.0.0.1", port, 1, 3, None, t));
        let e = exchange("127.0.0.1", port, 0, 2, Some(&[1, 2]), t).unwrap_err();
        assert!(e.to_string().contains("WORLD_SIZE=3"), "{e}");
        let e = peer.join().unwrap().unwrap_err();
        assert!(e.to_string().contains("refused rank 1"), "{e}");

        let port = free_port();
        let short = Duration::from_millis(500);
        let e = exchange("127.0.0.1", port, 0, 3, Some(&[1]), short).unwrap_err();
        assert!(e.to_string().contains("[1, 2]"), "{e}");
        let e = exchange("127.0.0.1", free_port(), 1, 3, None, short).unwrap_err();
        assert!(e.to_string().contains("could not reach rank 0"), "{e}");
        let e = exchange("127.0.0.1", port, 3, 3, None, short).unwrap_err();
        assert!(e.to_string().contains("not below"), "{e}");
    }
}
