//! For the policy's randomized tests: a seeded generator whose seed is printed, so a failure
//! can be replayed (`FLOODGATE_SEED=<n>`).

/// The seed (from `FLOODGATE_SEED`, else the clock), printed, and a xorshift generator.
pub fn seeded() -> (u64, impl FnMut() -> u64) {
    let seed = std::env::var("FLOODGATE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("seed {seed} (replay with FLOODGATE_SEED={seed})");
    let mut x = seed | 1;
    let next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (seed, next)
}
