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

/* ---- AHCI (Serial ATA AHCI 1.3.1): the port's command list, driven from C ---- */

#define PX_IS 0x10
#define PX_TFD 0x20
#define PX_SACT 0x34
#define PX_CI 0x38
#define PXIS_ERRORS 0x7dc00000u
#define ATA_READ_DMA_EXT 0x25
#define ATA_READ_FPDMA_QUEUED 0x60

static u32 next_random(u32 *state)
{
    *state = *state * 1664525u + 1013904223u;     /* Numerical Recipes' LCG: enough to scatter LBAs */
    return *state;
}

/* Write the H2D FIS's command, LBA and count fields for slot `slot`. */
static void disk_fis(const struct proxy_disk_loop *p, u32 slot, u64 lba, int queued)
{
    volatile u8 *fis = (volatile u8 *)(unsigned long)(p->tables + (u64)slot * p->table_size);
    fis[0] = 0x27;
    fis[1] = 0x80;
    fis[2] = queued ? ATA_READ_FPDMA_QUEUED : ATA_READ_DMA_EXT;
    fis[3] = queued ? (u8)p->sectors : 0;
    fis[4] = (u8)lba; fis[5] = (u8)(lba >> 8); fis[6] = (u8)(lba >> 16);
    fis[7] = 0x40;
    fis[8] = (u8)(lba >> 24); fis[9] = (u8)(lba >> 32); fis[10] = (u8)(lba >> 40);
    fis[11] = queued ? (u8)(p->sectors >> 8) : 0;
    fis[12] = queued ? (u8)(slot << 3) : (u8)p->sectors;
    fis[13] = queued ? 0 : (u8)(p->sectors >> 8);
    *(volatile u32 *)(unsigned long)(p->command_list + slot * 32 + 4) = 0;     /* PRDBC */
}

u64 native_disk_read(struct proxy_disk_loop *p, u64 bar, volatile u32 *progress)
{
    u64 port = bar + p->port_offset;
    u32 state = p->seed, issued = 0, done = 0, errors = 0, outstanding = 0, seq = 0;
    int queued = p->depth > 1;
    u64 start = rdtsc(), deadline = start + p->timeout_us * tsc_hz / 1000000;
    while (done < p->count && rdtsc() < deadline) {
        /* issue into every free slot while there is work */
        u32 fresh = 0;
        for (u32 slot = 0; slot < p->depth && issued < p->count; slot++) {
            if (outstanding & (1u << slot))
                continue;
            u64 lba = p->lba_span ? next_random(&state) % p->lba_span : (u64)seq++ * p->sectors;
            disk_fis(p, slot, lba, queued);
            fresh |= 1u << slot;
            issued++;
        }
        if (fresh) {
            if (queued)
                mmio_write32(port + PX_SACT, fresh);
            mmio_write32(port + PX_CI, fresh);
            outstanding |= fresh;
        }
        u32 busy = mmio_read32(port + (queued ? PX_SACT : PX_CI));
        u32 finished = outstanding & ~busy;
        if (!finished)
            continue;
        if (mmio_read32(port + PX_IS) & PXIS_ERRORS || mmio_read32(port + PX_TFD) & 1)
            errors++;
        outstanding &= ~finished;
        for (u32 f = finished; f; f &= f - 1)          /* one per finished slot; no libgcc here */
            done++;
        *progress = done;
    }
    p->done = done;
    p->errors = errors;
    return rdtsc() - start;
}
