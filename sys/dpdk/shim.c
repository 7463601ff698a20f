/*
 * The DPDK functions Embarcadero calls, behind plain C types.
 *
 * DPDK's fast path (rte_eth_rx_burst, rte_eth_tx_burst, mbuf allocation) is static inline
 * in its headers, so a Rust binding needs compiled C for it in any case; this shim is that C
 * and nothing else: twelve functions over integers, byte pointers and opaque handles, so no
 * DPDK struct layout crosses into Rust (sys/src/dpdk.rs declares them; docs/dpdk.md says
 * why this is preferred to bindgen over rte_ethdev.h).
 */
#define ALLOW_EXPERIMENTAL_API 1
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <string.h>

#include <rte_bus.h>
#include <rte_dev.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_lcore.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>

/* rte_eal_init, keeping the calling thread's CPU affinity (EAL pins its main thread to its
 * first lcore; the process's own threads must stay free to run anywhere). Returns 0 or a
 * negative errno. */
int embar_dpdk_init(int argc, char **argv) {
    cpu_set_t saved;
    int have = pthread_getaffinity_np(pthread_self(), sizeof(saved), &saved) == 0;
    int n = rte_eal_init(argc, argv);
    if (have) {
        pthread_setaffinity_np(pthread_self(), sizeof(saved), &saved);
    }
    if (n < 0) {
        return -(rte_errno ? rte_errno : EINVAL);
    }
    return 0;
}

const char *embar_dpdk_strerror(int err) { return rte_strerror(err); }

/* Gives the calling (non-EAL) thread an lcore id, so mempool caches serve it. */
int embar_dpdk_thread_register(void) {
    if (rte_lcore_id() != LCORE_ID_ANY) {
        return 0;
    }
    return rte_thread_register() == 0 ? 0 : -rte_errno;
}

/* A packet mbuf pool of `n` buffers of `data_room` bytes each (headroom included). */
void *embar_dpdk_pool(const char *name, unsigned n, unsigned data_room) {
    return rte_pktmbuf_pool_create(name, n, 256, 0, data_room, (int)rte_socket_id());
}

/* Probes the device `devargs` ("net_memif0,role=server,socket=..."), whose name is the part
 * before the first comma, and writes its port id. */
int embar_dpdk_attach(const char *devargs, uint16_t *port) {
    char name[RTE_ETH_NAME_MAX_LEN];
    size_t len = strcspn(devargs, ",");
    if (len == 0 || len >= sizeof(name)) {
        return -EINVAL;
    }
    memcpy(name, devargs, len);
    name[len] = 0;
    int rc = rte_dev_probe(devargs);
    if (rc < 0) {
        return rc;
    }
    if (rte_eth_dev_get_port_by_name(name, port) != 0) {
        return -ENODEV;
    }
    return 0;
}

/* One receive and one transmit queue, started, promiscuous (frames are addressed by the
 * session id inside them; af_packet ports share a link with other hosts' frames). */
int embar_dpdk_start(uint16_t port, void *pool, uint16_t rx_desc, uint16_t tx_desc) {
    struct rte_eth_conf conf;
    memset(&conf, 0, sizeof(conf));
    int rc = rte_eth_dev_configure(port, 1, 1, &conf);
    if (rc < 0) {
        return rc;
    }
    rc = rte_eth_dev_adjust_nb_rx_tx_desc(port, &rx_desc, &tx_desc);
    if (rc < 0) {
        return rc;
    }
    int socket = rte_eth_dev_socket_id(port);
    rc = rte_eth_rx_queue_setup(port, 0, rx_desc, socket < 0 ? 0 : socket, NULL, pool);
    if (rc < 0) {
        return rc;
    }
    rc = rte_eth_tx_queue_setup(port, 0, tx_desc, socket < 0 ? 0 : socket, NULL);
    if (rc < 0) {
        return rc;
    }
    rc = rte_eth_dev_start(port);
    if (rc < 0) {
        return rc;
    }
    rte_eth_promiscuous_enable(port);
    return 0;
}

int embar_dpdk_mac(uint16_t port, uint8_t mac[6]) {
    struct rte_ether_addr a;
    int rc = rte_eth_macaddr_get(port, &a);
    if (rc == 0) {
        memcpy(mac, a.addr_bytes, 6);
    }
    return rc;
}

/* 1 when the link is up, 0 when down, negative on error. */
int embar_dpdk_link_up(uint16_t port) {
    struct rte_eth_link link;
    int rc = rte_eth_link_get_nowait(port, &link);
    if (rc < 0) {
        return rc;
    }
    return link.link_status == RTE_ETH_LINK_UP;
}

/* Stops the port and removes its device (the driver's remove closes and frees the port:
 * closing it first would leave rte_dev_remove a freed device). */
int embar_dpdk_detach(uint16_t port) {
    struct rte_eth_dev_info info;
    int rc = rte_eth_dev_info_get(port, &info);
    if (rc < 0) {
        return rc;
    }
    struct rte_device *dev = info.device;
    rte_eth_dev_stop(port);
    if (dev == NULL) {
        return rte_eth_dev_close(port);
    }
    return rte_dev_remove(dev);
}

/* Receives up to `n` frames. Each received frame's mbuf goes to `mbufs[i]`; a frame in one
 * segment has its bytes at `data[i]`, `lens[i]` long; a frame in several segments gets
 * `data[i] = NULL` and its whole length (the caller drops it and counts it). Every mbuf
 * returned must be given back with embar_dpdk_free. */
uint16_t embar_dpdk_rx(uint16_t port, void **mbufs, const uint8_t **data, uint32_t *lens,
                       uint16_t n) {
    struct rte_mbuf **m = (struct rte_mbuf **)mbufs;
    uint16_t got = rte_eth_rx_burst(port, 0, m, n);
    for (uint16_t i = 0; i < got; i++) {
        lens[i] = rte_pktmbuf_pkt_len(m[i]);
        data[i] = m[i]->nb_segs == 1 ? rte_pktmbuf_mtod(m[i], const uint8_t *) : NULL;
    }
    return got;
}

void embar_dpdk_free(void **mbufs, uint16_t n) {
    rte_pktmbuf_free_bulk((struct rte_mbuf **)mbufs, n);
}

/* Allocates `n` single-segment frames of `lens[i]` bytes each and writes where their bytes
 * go to `data[i]`. All or nothing: returns 0, or a negative errno with nothing allocated. */
int embar_dpdk_alloc(void *pool, void **mbufs, uint8_t **data, const uint32_t *lens, uint16_t n) {
    struct rte_mbuf **m = (struct rte_mbuf **)mbufs;
    if (rte_pktmbuf_alloc_bulk(pool, m, n) != 0) {
        return -ENOBUFS;
    }
    for (uint16_t i = 0; i < n; i++) {
        char *p = rte_pktmbuf_append(m[i], (uint16_t)lens[i]);
        if (p == NULL || lens[i] > UINT16_MAX) {
            rte_pktmbuf_free_bulk(m, n);
            return -EMSGSIZE;
        }
        data[i] = (uint8_t *)p;
    }
    return 0;
}

/* Sends up to `n` frames; frees the ones the port did not take. Returns how many it took. */
uint16_t embar_dpdk_tx(uint16_t port, void **mbufs, uint16_t n) {
    struct rte_mbuf **m = (struct rte_mbuf **)mbufs;
    uint16_t sent = rte_eth_tx_burst(port, 0, m, n);
    if (sent < n) {
        rte_pktmbuf_free_bulk(m + sent, n - sent);
    }
    return sent;
}
