//! The client side of a connection, before any engine: the PROXY protocol header, the
//! connection caps and the accept filter ([`connections`]), the head deadline and the
//! rewind buffer ([`stream`]), and the dispatch to an engine ([`dispatch`]).

pub mod connections;
pub mod dispatch;
pub mod h2_frames;
pub mod proxy_protocol;
pub mod stream;
mod stream_traits;
pub mod tls;

pub use stream::ClientStream;
