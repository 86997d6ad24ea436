/*
 * native.c - the in-guest baselines: descriptor loops on the channel's NIC,
 * the way an in-kernel driver would run them, so the Python driver can be
 * judged by its ratio to them. Same rings, same NIC, no host in the loop.
 */
#include "kernel.h"

#define DESC 16
#define DESC_LEN 8
#define DESC_CMD 11
#define DESC_STATUS 12
#define STATUS_DD 0x01
#define TX_CMD (0x01 | 0x02 | 0x08)     /* EOP, IFCS, RS (8254x manual 3.3.3) */

static u8 *desc(const struct proxy_nic_loop *p, u32 i)
{
    return (u8 *)(unsigned long)(p->ring_phys + (u64)i * DESC);
}

u64 native_tx(struct proxy_nic_loop *p, u64 bar0, volatile u32 *progress)
{
    u32 n = p->entries, tail = p->next, clean = p->clean, sent = 0;
    u64 start = rdtsc(), deadline = start + p->timeout_us * tsc_hz / 1000000;
    while (sent < p->count && rdtsc() < deadline) {
        while (clean != tail && (*(volatile u8 *)(desc(p, clean) + DESC_STATUS) & STATUS_DD))
            clean = (clean + 1) % n;
        u32 free = (clean + n - tail - 1) % n;
        if (free > p->count - sent)
            free = p->count - sent;
        if (!free)
            continue;
        for (u32 k = 0; k < free; k++) {
            u8 *d = desc(p, tail);
            *(volatile u16 *)(d + DESC_LEN) = (u16)p->frame_len;
            *(volatile u8 *)(d + DESC_CMD) = TX_CMD;
            *(volatile u8 *)(d + DESC_STATUS) = 0;
            tail = (tail + 1) % n;
        }
        mmio_write32(bar0 + p->tail_reg, tail);         /* one tail write per batch */
        mmio_read32(bar0 + p->flush_reg);
        sent += free;
        *progress = sent;                               /* the host paces its peer by it */
    }
    p->next = tail;
    p->clean = clean;
    p->done = sent;
    return rdtsc() - start;
}

u64 native_rx(struct proxy_nic_loop *p, u64 bar0, volatile u32 *progress)
{
    u32 n = p->entries, next = p->next, got = 0;
    u64 start = rdtsc(), deadline = start + p->timeout_us * tsc_hz / 1000000;
    u64 idle = tsc_hz / 1000, last = start;
    while (got < p->count && rdtsc() < deadline) {
        u32 batch = 0;
        while (*(volatile u8 *)(desc(p, next) + DESC_STATUS) & STATUS_DD) {
            *(volatile u8 *)(desc(p, next) + DESC_STATUS) = 0;
            next = (next + 1) % n;
            batch++;
        }
        if (!batch) {
            /* Quiet for a millisecond: restate the tail. QEMU may hold frames it
             * queued while it thought the ring full until the tail is written. */
            if (rdtsc() - last > idle) {
                mmio_write32(bar0 + p->tail_reg, (next + n - 1) % n);
                mmio_read32(bar0 + p->flush_reg);
                last = rdtsc();
            }
            continue;
        }
        last = rdtsc();
        mmio_write32(bar0 + p->tail_reg, (next + n - 1) % n);   /* hand the buffers back */
        mmio_read32(bar0 + p->flush_reg);
        got += batch;
        *progress = got;
    }
    p->next = next;
    p->done = got;
    return rdtsc() - start;
}
