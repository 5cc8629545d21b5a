//! The socket options the programs set or watch (include/uapi/asm-generic/socket.h,
//! include/uapi/linux/tcp.h).
pub const SOL_SOCKET: i32 = 1;
pub const SO_KEEPALIVE: i32 = 9;
pub const SOL_TCP: i32 = 6;
pub const TCP_KEEPIDLE: i32 = 4;
pub const TCP_KEEPINTVL: i32 = 5;
pub const TCP_KEEPCNT: i32 = 6;
pub const TCP_USER_TIMEOUT: i32 = 18;
