//! For the policy's randomized tests: the seeded generator every randomized test uses
//! (`testkit::seeded`: the seed printed, replay with `FLOODGATE_SEED=<n>`).

pub use testkit::seeded;
