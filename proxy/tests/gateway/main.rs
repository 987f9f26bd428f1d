//! The gateway's black-box tests: the real `gateway` binary in front of real HTTP upstreams,
//! one module per feature, linked once. `FLOODGATE_TEST_PATH=pingora` runs them again with
//! the own HTTP/1 engine off (`make test` does both).

mod attacks;
mod balancing;
mod cluster;
mod common;
mod own_engine;
mod protection;
mod proxying;
mod reload;
mod routing;
mod tls;
mod upstream_tls;
