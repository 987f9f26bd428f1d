//! The request policy: every decision the gateway makes about a request, as plain functions
//! over plain data (method, target, header values, client and peer address, the config
//! snapshot), with no sockets and no pingora types. Every engine calls these and only moves
//! bytes: the gateway's own HTTP/1 engine ([`crate::h1`]) and pingora's ([`crate::pingora_h1`]).
//!
//! | step                        | function                                   |
//! |-----------------------------|--------------------------------------------|
//! | who the client is           | [`identity::client_ip`]                    |
//! | request id                  | [`identity::usable_request_id`], [`crate::state::Gateway::new_request_id`] |
//! | head and body size caps     | [`admit::check_head`], [`admit::check_declared_body`] |
//! | target, Host, framing, connection | [`request::check`]                   |
//! | the body as it arrives      | [`body::check_progress`]                   |
//! | which route (pool or answer)| [`route::choose`]                          |
//! | rate limits                 | [`admit::admit`] (on [`path::normalize`]d paths) |
//! | retry after a failure       | [`retry::decide`]                          |
//! | a backend failure's answer  | [`outcome::after_failure`]                 |
//! | keep-alive after an error   | [`outcome::keep_alive_after_error`]        |
//! | forwarding headers          | [`identity::Forwarding`], [`headers::replaced_by_gateway`] |
//! | headers never passed on     | [`headers::not_forwarded`], [`headers::hop_by_hop`] |
//! | the answer's framing        | [`framing::answer_framing`]                |
//! | backend affinity (`hash`)   | [`affinity::key`]                          |
//! | metrics and access log      | [`record::record`]                         |

pub mod admit;
pub mod affinity;
pub mod body;
pub mod framing;
pub mod headers;
pub mod identity;
pub mod outcome;
pub mod path;
pub mod record;
pub mod rejection;
pub mod request;
pub mod retry;
pub mod route;
#[cfg(test)]
pub mod testing;

pub use rejection::Rejection;
