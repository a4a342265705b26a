pub use ztunnel;
