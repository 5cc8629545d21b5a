/* The record tcpmgm keeps for each socket it decides, for the process that owns the
 * socket: look it up by the socket's fd in the socket-storage map pinned as
 * TCPMGM_SOCKETS_PIN in tcpmgm's pin directory (see socket_profile.c beside this
 * header). Generated from tcpmgm-common/src/abi.rs by `cargo xtask header`. */

#ifndef TCPMGM_H
#define TCPMGM_H

#include <stdint.h>

/**
 * The pin name of the per-socket records in tcpmgm's pin directory.
 */
#define TCPMGM_SOCKETS_PIN "TCPMGM_SOCKETS_V3"

/**
 * The layout version of `struct tcpmgm_sock_record`.
 */
#define TCPMGM_SOCK_RECORD_VERSION 3

/**
 * `tcpmgm_sock_record.state`: a storage made (by the setsockopt hook) and no rule decided.
 */
#define TCPMGM_SOCK_UNDECIDED 0

/**
 * `tcpmgm_sock_record.state`: decided, and no rule matched: the system's settings apply. Written by
 * tcpmgm before 2026-12 (a socket no rule matches now gets no record); still read as no rule.
 */
#define TCPMGM_SOCK_NO_RULE 1

/**
 * `tcpmgm_sock_record.state`: decided, and `profile` is the winning rule's.
 */
#define TCPMGM_SOCK_RULE 2

/**
 * tcpmgm set TCP_USER_TIMEOUT to bound the handshake (lifted at establishment).
 */
#define TCPMGM_MARK_CONNECT_TIMEOUT (1 << 0)

/**
 * The application set TCP_USER_TIMEOUT itself.
 */
#define TCPMGM_MARK_APP_USER_TIMEOUT (1 << 1)

/**
 * Decided in audit mode (`settings::AUDIT`).
 */
#define TCPMGM_MARK_AUDIT (1 << 2)

/**
 * Decided while the application's own options were allowed (`settings::APP_OPTIONS_ALLOW`).
 */
#define TCPMGM_MARK_APP_OPTIONS_ALLOW (1 << 3)

/**
 * A retransmission timeout expired: the kernel gives the connection up (user timeout, connect
 * timeout, retransmission limit).
 */
#define TCPMGM_MARK_TIMED_OUT (1 << 4)

/**
 * A reset came from the peer.
 */
#define TCPMGM_MARK_PEER_RESET (1 << 5)

/**
 * The application closed the socket (close() on this host).
 */
#define TCPMGM_MARK_APP_CLOSED (1 << 6)

/**
 * The socket was destroyed on this host (sock_diag SOCK_DESTROY, tcp_abort).
 */
#define TCPMGM_MARK_DESTROYED (1 << 7)

/**
 * Decided while the outcome tracers were attached (`settings::TRACED`), which leave
 * `TCPMGM_MARK_PEER_RESET`, `TCPMGM_MARK_APP_CLOSED` and `TCPMGM_MARK_DESTROYED`.
 */
#define TCPMGM_MARK_TRACED (1 << 8)

/**
 * How many attrs pairs a profile carries, and how long a key may be.
 */
#define TCPMGM_MAX_ATTRS 4

#define TCPMGM_MAX_ATTR_KEY 24

/**
 * The rule says keepalive=1: SO_KEEPALIVE on, and the non-zero keep* values applied.
 */
#define TCPMGM_FLAG_KEEPALIVE_ON (1 << 0)

/**
 * The rule says keepalive=0: SO_KEEPALIVE off.
 */
#define TCPMGM_FLAG_KEEPALIVE_OFF (1 << 1)

/**
 * no_new_conn=1: connect() to a matching destination fails with EPERM.
 */
#define TCPMGM_FLAG_NO_NEW_CONN (1 << 2)

/**
 * The rule's connect_timeout is enforced (see `tcpmgm run --enforce-default-connect-timeout`
 * for OpenSIPS's schema default).
 */
#define TCPMGM_FLAG_CONNECT_TIMEOUT (1 << 3)

/**
 * One `key=int` pair of a rule's attrs; an all-zero key is no pair.
 */
struct tcpmgm_attr {
  int64_t value;
  /**
   * NUL-padded.
   */
  uint8_t key[TCPMGM_MAX_ATTR_KEY];
};

/**
 * What the programs apply for a rule. Every column of the OpenSIPS profile is carried so that
 * `bpftool map dump` shows the whole profile; the programs act on the keepalive and connect
 * fields and on `flags`.
 */
struct tcpmgm_profile {
  /**
   * The rule's `id` in the table (0 in the `TCPMGM_PROFILES` map, whose entries rules share; the
   * `TCPMGM_RANKS` map gives each rank its rule's id).
   */
  uint32_t rule_id;
  /**
   * The rule's position in match order (0 in the `TCPMGM_PROFILES` map).
   */
  uint32_t rank;
  uint32_t flags;
  /**
   * TCP_KEEPIDLE seconds; 0 leaves the system value.
   */
  uint32_t keepidle;
  /**
   * TCP_KEEPINTVL seconds; 0 leaves the system value.
   */
  uint32_t keepintvl;
  /**
   * TCP_KEEPCNT; 0 leaves the system value.
   */
  uint32_t keepcnt;
  /**
   * TCP_USER_TIMEOUT in ms while the handshake runs; 0 leaves the system behaviour.
   */
  uint32_t connect_timeout_ms;
  /**
   * Initial SYN retransmission timeout in jiffies (TIMEOUT_INIT reply); 0 leaves the default.
   */
  uint32_t syn_rto_jiffies;
  uint32_t con_lifetime_s;
  uint32_t msg_read_timeout_s;
  uint32_t send_threshold_us;
  uint8_t alias_mode;
  uint8_t parallel_read;
  uint8_t _pad[2];
  /**
   * The rule's attrs (`key=int;...`), for the application that owns the socket.
   */
  struct tcpmgm_attr attrs[TCPMGM_MAX_ATTRS];
};

/**
 * What a socket was decided: stored per socket at the first hook that sees it, so that every
 * later hook, whatever rule set is loaded by then, applies the same decision, and so that the
 * application owning the socket can read its profile. Only sockets a rule matched have one
 * (and sockets the application gave options to before connect(), whose record stays
 * `TCPMGM_SOCK_UNDECIDED` when no rule matched): no record, or none in `TCPMGM_SOCK_RULE`, means no rule.
 */
struct tcpmgm_sock_record {
  /**
   * `TCPMGM_SOCK_UNDECIDED` (a fresh storage), `TCPMGM_SOCK_NO_RULE` or `TCPMGM_SOCK_RULE`.
   */
  uint32_t state;
  /**
   * `marks::*` bits: what tcpmgm and the application did to the socket's options.
   */
  uint32_t marks;
  /**
   * The TCP_USER_TIMEOUT the application asked for while tcpmgm's connect timeout held the
   * handshake; it takes effect once the connection is established.
   */
  uint32_t app_user_timeout_ms;
  /**
   * The generation (rule set) that decided the socket, for inspection with bpftool; tcpmgm
   * itself does not read it.
   */
  uint32_t generation;
  struct tcpmgm_profile profile;
};

#endif  /* TCPMGM_H */
