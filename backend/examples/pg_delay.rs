//! A throttled database connection for loadtest/'s overload scenario: a TCP relay that holds
//! every chunk the server sends for `delay_ms` before passing it on (order kept), so each
//! query's round trip takes that much longer, as from a slow or distant database, without a
//! test-only query in the service.
//! Usage: pg_delay <listen addr> <server addr> <delay_ms>

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::main]
async fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() < 3 {
        eprintln!("usage: pg_delay <listen addr> <server addr> <delay_ms>");
        std::process::exit(2);
    }
    let listener = TcpListener::bind(&a[0]).await.expect("listen");
    let server = a[1].clone();
    let delay = Duration::from_millis(a[2].parse().expect("delay_ms"));
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let server = server.clone();
        tokio::spawn(async move {
            let Ok(upstream) = TcpStream::connect(&server).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let (mut cr, mut cw) = client.into_split();
            let (mut ur, mut uw) = upstream.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut cr, &mut uw).await;
                let _ = uw.shutdown().await;
            });
            let (tx, mut rx) =
                tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
            tokio::spawn(async move {
                while let Some((at, chunk)) = rx.recv().await {
                    tokio::time::sleep_until(at + delay).await;
                    if cw.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
                let _ = cw.shutdown().await;
            });
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = ur.read(&mut buf).await {
                if n == 0
                    || tx
                        .send((tokio::time::Instant::now(), buf[..n].to_vec()))
                        .is_err()
                {
                    break;
                }
            }
        });
    }
}
