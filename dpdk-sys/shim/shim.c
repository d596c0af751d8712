/* See shim.h: forwards to DPDK's static-inline functions. */
#include "shim.h"

#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <rte_prefetch.h>
#include <rte_ring.h>

int shim_rte_errno(void) { return rte_errno; }
unsigned shim_rte_lcore_id(void) { return rte_lcore_id(); }

uint16_t shim_rte_eth_rx_burst(uint16_t port_id, uint16_t queue_id,
			       struct rte_mbuf **rx_pkts, uint16_t nb_pkts)
{
	return rte_eth_rx_burst(port_id, queue_id, rx_pkts, nb_pkts);
}

void shim_prefetch_lines(const void *p, uint32_t len)
{
	const char *c = p;
	for (uint32_t o = 0; o < len; o += RTE_CACHE_LINE_SIZE)
		rte_prefetch0(c + o);
}

uint16_t shim_rte_eth_rx_burst_views(uint16_t port_id, uint16_t queue_id,
				     struct rte_mbuf **rx_pkts, uint16_t nb_pkts,
				     struct shim_rx_view *views)
{
	uint16_t n = rte_eth_rx_burst(port_id, queue_id, rx_pkts, nb_pkts);
	for (uint16_t i = 0; i < n; i++) {
		const struct rte_mbuf *m = rx_pkts[i];
		views[i].data = rte_pktmbuf_mtod(m, const void *);
		views[i].ol_flags = m->ol_flags;
		views[i].pkt_len = m->pkt_len;
		views[i].data_len = m->data_len;
		views[i].nb_segs = m->nb_segs;
	}
	return n;
}

uint16_t shim_rte_eth_tx_burst(uint16_t port_id, uint16_t queue_id,
			       struct rte_mbuf **tx_pkts, uint16_t nb_pkts)
{
	return rte_eth_tx_burst(port_id, queue_id, tx_pkts, nb_pkts);
}

uint16_t shim_rte_eth_tx_prepare(uint16_t port_id, uint16_t queue_id,
				 struct rte_mbuf **tx_pkts, uint16_t nb_pkts)
{
	return rte_eth_tx_prepare(port_id, queue_id, tx_pkts, nb_pkts);
}

struct rte_mbuf *shim_rte_pktmbuf_alloc(struct rte_mempool *mp) { return rte_pktmbuf_alloc(mp); }

int shim_rte_pktmbuf_alloc_bulk(struct rte_mempool *mp, struct rte_mbuf **mbufs, unsigned count)
{
	return rte_pktmbuf_alloc_bulk(mp, mbufs, count);
}

void shim_rte_pktmbuf_free(struct rte_mbuf *m) { rte_pktmbuf_free(m); }
void shim_rte_pktmbuf_reset(struct rte_mbuf *m) { rte_pktmbuf_reset(m); }
uint16_t shim_rte_pktmbuf_data_room_size(struct rte_mempool *mp) { return rte_pktmbuf_data_room_size(mp); }

void *shim_rte_pktmbuf_mtod(struct rte_mbuf *m) { return rte_pktmbuf_mtod(m, void *); }
uint16_t shim_rte_pktmbuf_data_len(const struct rte_mbuf *m) { return m->data_len; }
void shim_rte_pktmbuf_set_data_len(struct rte_mbuf *m, uint16_t len) { m->data_len = len; }
uint32_t shim_rte_pktmbuf_pkt_len(const struct rte_mbuf *m) { return m->pkt_len; }
void shim_rte_pktmbuf_set_pkt_len(struct rte_mbuf *m, uint32_t len) { m->pkt_len = len; }
uint16_t shim_rte_pktmbuf_nb_segs(const struct rte_mbuf *m) { return m->nb_segs; }
uint16_t shim_rte_pktmbuf_headroom(const struct rte_mbuf *m) { return rte_pktmbuf_headroom(m); }
uint16_t shim_rte_pktmbuf_tailroom(const struct rte_mbuf *m) { return rte_pktmbuf_tailroom(m); }
char *shim_rte_pktmbuf_append(struct rte_mbuf *m, uint16_t len) { return rte_pktmbuf_append(m, len); }
char *shim_rte_pktmbuf_prepend(struct rte_mbuf *m, uint16_t len) { return rte_pktmbuf_prepend(m, len); }
int shim_rte_pktmbuf_trim(struct rte_mbuf *m, uint16_t len) { return rte_pktmbuf_trim(m, len); }
char *shim_rte_pktmbuf_adj(struct rte_mbuf *m, uint16_t len) { return rte_pktmbuf_adj(m, len); }
const void *shim_rte_pktmbuf_read(const struct rte_mbuf *m, uint32_t off, uint32_t len, void *buf)
{
	return rte_pktmbuf_read(m, off, len, buf);
}

uint64_t shim_rte_mbuf_ol_flags(const struct rte_mbuf *m) { return m->ol_flags; }
void shim_rte_mbuf_set_ol_flags(struct rte_mbuf *m, uint64_t flags) { m->ol_flags = flags; }
uint32_t shim_rte_mbuf_packet_type(const struct rte_mbuf *m) { return m->packet_type; }

void shim_rte_mbuf_set_tx_offload(struct rte_mbuf *m, uint8_t l2_len, uint8_t l3_len,
				  uint8_t l4_len, uint16_t tso_segsz)
{
	m->l2_len = l2_len;
	m->l3_len = l3_len;
	m->l4_len = l4_len;
	m->tso_segsz = tso_segsz;
}

typedef int (*shim_from_rings_fn)(const char *name, struct rte_ring *const rx[],
				  unsigned nb_rx, struct rte_ring *const tx[],
				  unsigned nb_tx, unsigned numa_node);

int shim_ring_pair(const char *plugin, const char *name_a, const char *name_b,
		   unsigned ring_size, uint16_t *port_a, uint16_t *port_b)
{
	void *lib = dlopen(plugin, RTLD_NOW | RTLD_NOLOAD);
	if (lib == NULL)
		return -ENOENT;
	shim_from_rings_fn from_rings = (shim_from_rings_fn)dlsym(lib, "rte_eth_from_rings");
	if (from_rings == NULL) {
		dlclose(lib);
		return -ENOSYS;
	}
	char name[RTE_RING_NAMESIZE];
	snprintf(name, sizeof(name), "pr_%s", name_a);
	struct rte_ring *a_to_b = rte_ring_create(name, ring_size, rte_socket_id(),
						  RING_F_SP_ENQ | RING_F_SC_DEQ);
	snprintf(name, sizeof(name), "pr_%s", name_b);
	struct rte_ring *b_to_a = rte_ring_create(name, ring_size, rte_socket_id(),
						  RING_F_SP_ENQ | RING_F_SC_DEQ);
	if (a_to_b == NULL || b_to_a == NULL) {
		int err = rte_errno;
		rte_ring_free(a_to_b);
		rte_ring_free(b_to_a);
		dlclose(lib);
		return -err;
	}
	int a = from_rings(name_a, &b_to_a, 1, &a_to_b, 1, rte_socket_id());
	int b = a < 0 ? a : from_rings(name_b, &a_to_b, 1, &b_to_a, 1, rte_socket_id());
	/* The plugin stays loaded by EAL's own handle. */
	dlclose(lib);
	if (a < 0 || b < 0)
		return -rte_errno;
	*port_a = (uint16_t)a;
	*port_b = (uint16_t)b;
	return 0;
}
