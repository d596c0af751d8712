/*
 * C shim over DPDK's static-inline API.
 *
 * bindgen cannot bind `static inline` functions (they have no symbol), and
 * the mbuf/ethdev fast path is almost entirely inline. Each wrapper here is a
 * one-line forward so that, with LTO off, the cost is one extra call.
 * Bit-field members of rte_mbuf (l2_len, tso_segsz, ...) are also set here
 * so Rust never depends on bindgen's bit-field layout.
 */
#ifndef ISCSI_BYPASS_DPDK_SHIM_H
#define ISCSI_BYPASS_DPDK_SHIM_H

#include <stdint.h>

#include <rte_config.h>
#include <rte_common.h>
#include <rte_errno.h>
#include <rte_eal.h>
#include <rte_lcore.h>
#include <rte_mempool.h>
#include <rte_mbuf.h>
#include <rte_ethdev.h>

/*
 * Constants whose macros bindgen cannot evaluate (RTE_BIT64 and friends) are
 * re-exported as enumerators, which clang evaluates for bindgen.
 */
enum shim_limits {
	SHIM_PKTMBUF_HEADROOM = RTE_PKTMBUF_HEADROOM,
	SHIM_MBUF_DEFAULT_BUF_SIZE = RTE_MBUF_DEFAULT_BUF_SIZE,
	SHIM_ETHER_HDR_LEN = RTE_ETHER_HDR_LEN,
	SHIM_ETHER_CRC_LEN = RTE_ETHER_CRC_LEN,
	SHIM_MAX_LCORE = RTE_MAX_LCORE,
	SHIM_LCORE_ID_ANY = (int)LCORE_ID_ANY,
};

/* 64-bit flag words as `static const`, which bindgen turns into consts. */
static const uint64_t SHIM_ETH_RX_OFFLOAD_IPV4_CKSUM = RTE_ETH_RX_OFFLOAD_IPV4_CKSUM;
static const uint64_t SHIM_ETH_RX_OFFLOAD_TCP_CKSUM = RTE_ETH_RX_OFFLOAD_TCP_CKSUM;
static const uint64_t SHIM_ETH_TX_OFFLOAD_IPV4_CKSUM = RTE_ETH_TX_OFFLOAD_IPV4_CKSUM;
static const uint64_t SHIM_ETH_TX_OFFLOAD_TCP_CKSUM = RTE_ETH_TX_OFFLOAD_TCP_CKSUM;
static const uint64_t SHIM_ETH_TX_OFFLOAD_TCP_TSO = RTE_ETH_TX_OFFLOAD_TCP_TSO;
static const uint64_t SHIM_ETH_TX_OFFLOAD_MBUF_FAST_FREE = RTE_ETH_TX_OFFLOAD_MBUF_FAST_FREE;
static const uint64_t SHIM_ETH_TX_OFFLOAD_MULTI_SEGS = RTE_ETH_TX_OFFLOAD_MULTI_SEGS;
static const uint64_t SHIM_ETH_RX_OFFLOAD_TCP_LRO = RTE_ETH_RX_OFFLOAD_TCP_LRO;
static const uint64_t SHIM_ETH_RX_OFFLOAD_SCATTER = RTE_ETH_RX_OFFLOAD_SCATTER;
static const uint64_t SHIM_ETH_RSS_IP = RTE_ETH_RSS_IP;
static const uint64_t SHIM_ETH_RSS_TCP = RTE_ETH_RSS_TCP;
static const uint64_t SHIM_MBUF_F_RX_IP_CKSUM_MASK = RTE_MBUF_F_RX_IP_CKSUM_MASK;
static const uint64_t SHIM_MBUF_F_RX_IP_CKSUM_GOOD = RTE_MBUF_F_RX_IP_CKSUM_GOOD;
static const uint64_t SHIM_MBUF_F_RX_L4_CKSUM_MASK = RTE_MBUF_F_RX_L4_CKSUM_MASK;
static const uint64_t SHIM_MBUF_F_RX_L4_CKSUM_GOOD = RTE_MBUF_F_RX_L4_CKSUM_GOOD;
static const uint64_t SHIM_MBUF_F_TX_IPV4 = RTE_MBUF_F_TX_IPV4;
static const uint64_t SHIM_MBUF_F_TX_IP_CKSUM = RTE_MBUF_F_TX_IP_CKSUM;
static const uint64_t SHIM_MBUF_F_TX_TCP_CKSUM = RTE_MBUF_F_TX_TCP_CKSUM;
static const uint64_t SHIM_MBUF_F_TX_TCP_SEG = RTE_MBUF_F_TX_TCP_SEG;

/* errno / lcore (thread-local or inline in DPDK). */
int shim_rte_errno(void);
unsigned shim_rte_lcore_id(void);

/* ethdev fast path. */
uint16_t shim_rte_eth_rx_burst(uint16_t port_id, uint16_t queue_id,
			       struct rte_mbuf **rx_pkts, uint16_t nb_pkts);
uint16_t shim_rte_eth_tx_burst(uint16_t port_id, uint16_t queue_id,
			       struct rte_mbuf **tx_pkts, uint16_t nb_pkts);

/*
 * What the receive path reads of each received mbuf, filled for the whole
 * burst by the call that receives it (instead of one call per field per
 * mbuf).
 */
struct shim_rx_view {
	const void *data; /* rte_pktmbuf_mtod */
	uint64_t ol_flags;
	uint32_t pkt_len;
	uint16_t data_len;
	uint16_t nb_segs;
};
/* Prefetches [p, p + len) into the cache, a line at a time. */
void shim_prefetch_lines(const void *p, uint32_t len);

/* rte_eth_rx_burst, then views[i] for each of the rx_pkts[i] received. */
uint16_t shim_rte_eth_rx_burst_views(uint16_t port_id, uint16_t queue_id,
				     struct rte_mbuf **rx_pkts, uint16_t nb_pkts,
				     struct shim_rx_view *views);
uint16_t shim_rte_eth_tx_prepare(uint16_t port_id, uint16_t queue_id,
				 struct rte_mbuf **tx_pkts, uint16_t nb_pkts);

/* mbuf allocation. */
struct rte_mbuf *shim_rte_pktmbuf_alloc(struct rte_mempool *mp);
int shim_rte_pktmbuf_alloc_bulk(struct rte_mempool *mp, struct rte_mbuf **mbufs,
				unsigned count);
void shim_rte_pktmbuf_free(struct rte_mbuf *m);
void shim_rte_pktmbuf_reset(struct rte_mbuf *m);
uint16_t shim_rte_pktmbuf_data_room_size(struct rte_mempool *mp);

/* mbuf data. */
void *shim_rte_pktmbuf_mtod(struct rte_mbuf *m);
uint16_t shim_rte_pktmbuf_data_len(const struct rte_mbuf *m);
void shim_rte_pktmbuf_set_data_len(struct rte_mbuf *m, uint16_t len);
uint32_t shim_rte_pktmbuf_pkt_len(const struct rte_mbuf *m);
void shim_rte_pktmbuf_set_pkt_len(struct rte_mbuf *m, uint32_t len);
uint16_t shim_rte_pktmbuf_nb_segs(const struct rte_mbuf *m);
uint16_t shim_rte_pktmbuf_headroom(const struct rte_mbuf *m);
uint16_t shim_rte_pktmbuf_tailroom(const struct rte_mbuf *m);
char *shim_rte_pktmbuf_append(struct rte_mbuf *m, uint16_t len);
char *shim_rte_pktmbuf_prepend(struct rte_mbuf *m, uint16_t len);
int shim_rte_pktmbuf_trim(struct rte_mbuf *m, uint16_t len);
char *shim_rte_pktmbuf_adj(struct rte_mbuf *m, uint16_t len);
/* rte_pktmbuf_read: `len` bytes from `off` of a (maybe chained) mbuf, as a
 * pointer into the first segment when they lie there, else copied into
 * `buf` (which must hold `len` bytes); NULL when the packet is shorter. */
const void *shim_rte_pktmbuf_read(const struct rte_mbuf *m, uint32_t off, uint32_t len, void *buf);

/* mbuf offload metadata. */
uint64_t shim_rte_mbuf_ol_flags(const struct rte_mbuf *m);
void shim_rte_mbuf_set_ol_flags(struct rte_mbuf *m, uint64_t flags);
uint32_t shim_rte_mbuf_packet_type(const struct rte_mbuf *m);
void shim_rte_mbuf_set_tx_offload(struct rte_mbuf *m, uint8_t l2_len, uint8_t l3_len,
				  uint8_t l4_len, uint16_t tso_segsz);

/*
 * Two ring ports joined back to back (what one sends, the other receives):
 * two rte_rings crossed through rte_eth_from_rings, which lives in the
 * net_ring PMD. That PMD is a plugin EAL has already dlopen()ed from
 * `plugin`; the function is looked up there rather than linked a second
 * time. Ports are named net_ring_<name_a> and net_ring_<name_b>. Returns 0
 * or a negative errno (-ENOENT: plugin not loaded, -ENOSYS: no such symbol).
 */
int shim_ring_pair(const char *plugin, const char *name_a, const char *name_b,
		   unsigned ring_size, uint16_t *port_a, uint16_t *port_b);

#endif
