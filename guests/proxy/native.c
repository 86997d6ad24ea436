/*
 * native.c - the in-guest baselines: descriptor and command loops on the
 * channel's device, written as a good in-kernel driver would write them, so
 * the Python driver can be judged by its ratio to them. Same rings, same
 * device, same work per frame or command as the Python side (the host
 * benches say where the two differ), no host in the loop.
 *
 * The host times each loop from outside (one clock for both sides); the TSC
 * figure they return is kept only as a cross-check. Every address a loop
 * touches or hands to the device is checked against the channel's DMA domain.
 */
#include "kernel.h"

#define DESC 16
#define DESC_ADDR 0
#define DESC_LEN 8
#define DESC_CMD 11
#define DESC_STATUS 12
#define STATUS_DD 0x01
#define TX_CMD (0x01 | 0x02 | 0x08)     /* EOP, IFCS, RS (8254x manual 3.3.3) */

static u8 *desc(const struct proxy_nic_loop *p, u32 i)
{
    return (u8 *)(unsigned long)(p->ring_phys + (u64)i * DESC);
}

/* Copy a frame by 8-byte words, rounding up: buffers are 2048 bytes, frames at most 16 KiB. */
static void copy_frame(u64 dst, u64 src, u32 len)
{
    u64 *d = (u64 *)(unsigned long)dst;
    const u64 *s = (const u64 *)(unsigned long)src;
    for (u32 i = 0; i < (len + 7) / 8; i++)
        d[i] = s[i];
}

static void write_tail(const struct proxy_nic_loop *p, u64 bar0, u32 tail)
{
    mmio_write32(bar0 + p->tail_reg, tail);
    if (p->flush_reg)
        mmio_read32(bar0 + p->flush_reg);
}

/* Send `count` copies of the frame: fill every free descriptor, one tail write per
 * batch, until every descriptor has been written back (DD). The host starts it with
 * nothing in flight (clean == next). Returns a request status. */
u16 native_tx(struct proxy_nic_loop *p, const struct window *dma, u64 bar0, volatile u32 *progress)
{
    u32 n = p->entries, tail = p->next, clean = p->clean, queued = 0, sent = 0;
    u64 deadline = rdtsc() + p->timeout_us * tsc_hz / 1000000;
    while (sent < p->count) {
        if (rdtsc() > deadline)
            break;
        while (clean != tail && (*(volatile u8 *)(desc(p, clean) + DESC_STATUS) & STATUS_DD)) {
            clean = clean + 1 == n ? 0 : clean + 1;
            sent++;
        }
        *progress = sent;
        u32 free = clean > tail ? clean - tail - 1 : clean + n - tail - 1;
        if (free > p->count - queued)
            free = p->count - queued;
        if (!free)
            continue;
        for (u32 k = 0; k < free; k++) {
            u8 *d = desc(p, tail);
            if (p->zero_copy) {                     /* as E1000.send_from: the frame where it is */
                *(volatile u64 *)(d + DESC_ADDR) = p->frame_phys;
            } else {
                u64 buffer = *(volatile u64 *)(d + DESC_ADDR);
                if (!in_window(dma, buffer, p->frame_len))
                    return PROXY_STATUS_DENIED;
                copy_frame(buffer, p->frame_phys, p->frame_len);
            }
            *(volatile u16 *)(d + DESC_LEN) = (u16)p->frame_len;
            *(volatile u8 *)(d + DESC_CMD) = TX_CMD;
            *(volatile u8 *)(d + DESC_STATUS) = 0;
            tail = tail + 1 == n ? 0 : tail + 1;
        }
        write_tail(p, bar0, tail);                  /* one tail write per batch */
        queued += free;
    }
    p->next = tail;
    p->clean = clean;
    p->done = sent;
    return sent == p->count ? PROXY_STATUS_OK : PROXY_STATUS_TIMEOUT;
}

/* Receive `count` frames: copy each out of its buffer into the sink, hand the
 * buffers back with one tail write per batch of what had arrived. */
u16 native_rx(struct proxy_nic_loop *p, const struct window *dma, u64 bar0, volatile u32 *progress)
{
    u32 n = p->entries, next = p->next, got = 0;
    u64 start = rdtsc(), deadline = start + p->timeout_us * tsc_hz / 1000000;
    u64 idle = tsc_hz / 1000, last = start;
    while (got < p->count) {
        u32 batch = 0;
        u8 *d;
        while (got + batch < p->count && (*(volatile u8 *)((d = desc(p, next)) + DESC_STATUS) & STATUS_DD)) {
            u32 len = *(volatile u16 *)(d + DESC_LEN);
            u64 buffer = *(volatile u64 *)(d + DESC_ADDR);
            if (len > PROXY_NIC_SINK_BYTES || !in_window(dma, buffer, len))
                return PROXY_STATUS_DENIED;
            if (p->frame_phys)
                copy_frame(p->frame_phys, buffer, len);
            *(volatile u8 *)(d + DESC_STATUS) = 0;
            next = next + 1 == n ? 0 : next + 1;
            batch++;
        }
        u64 now = rdtsc();
        if (!batch) {
            if (now > deadline)
                break;
            /* Quiet for a millisecond: restate the tail, as the Python driver does. QEMU
             * may hold frames it queued while it thought the ring full until then. */
            if (now - last > idle) {
                write_tail(p, bar0, next == 0 ? n - 1 : next - 1);
                last = rdtsc();
            }
            continue;
        }
        last = now;
        write_tail(p, bar0, next == 0 ? n - 1 : next - 1);     /* hand the buffers back */
        got += batch;
        *progress = got;
    }
    p->next = next;
    p->done = got;
    return got == p->count ? PROXY_STATUS_OK : PROXY_STATUS_TIMEOUT;
}

/* ---- the e1000 bridge: two NICs in one DMA domain, as harness/services/bridge.py ---- */

#define RX_EOP 0x02
#define BUFFER 2048                     /* RCTL.BSIZE = 00, as the Python driver sets it */

struct fwd_frame { u64 buffer; u32 len; };

static int pool_pop(struct proxy_nic_forward *p, const struct window *dma, u64 *buffer)
{
    if (!p->pool_free)
        return 0;
    *buffer = ((volatile u64 *)(unsigned long)p->pool)[--p->pool_free];
    return in_window(dma, *buffer, BUFFER) ? 1 : -1;
}

/* A full stack means the host handed out more buffers than the pool holds: the extra is lost. */
static void pool_push(struct proxy_nic_forward *p, u64 buffer)
{
    if (p->pool_free < p->pool_size)
        ((volatile u64 *)(unsigned long)p->pool)[p->pool_free++] = buffer;
}

/* As E1000.recv_buffers: up to `batch` received frames, each descriptor refilled from the
 * pool, one tail write (and flush read) for the lot. Returns how many, or -1 if an
 * address is outside the domain. */
static int fwd_receive(struct proxy_nic_forward *p, struct proxy_nic_port *port, const struct window *dma,
                       u64 bar0, struct fwd_frame *out)
{
    u32 n = port->rx_entries, i = port->rx_next;
    int got = 0;
    while ((u32)got < p->batch) {
        u8 *d = (u8 *)(unsigned long)(port->rx_ring + (u64)i * DESC);
        u8 status = *(volatile u8 *)(d + DESC_STATUS);
        if (!(status & STATUS_DD))
            break;
        u64 fresh;
        int popped = pool_pop(p, dma, &fresh);
        if (popped <= 0) {
            if (popped < 0)
                return -1;
            break;
        }
        u64 held = *(volatile u64 *)(d + DESC_ADDR);
        if (!in_window(dma, held, BUFFER))
            return -1;
        if (status & RX_EOP) {
            out[got].buffer = held;
            out[got++].len = *(volatile u16 *)(d + DESC_LEN);
        } else {
            pool_push(p, held);
        }
        *(volatile u64 *)(d + DESC_ADDR) = fresh;
        *(volatile u8 *)(d + DESC_STATUS) = 0;
        i = i + 1 == n ? 0 : i + 1;
    }
    if (i != port->rx_next) {
        port->rx_next = i;
        mmio_write32(bar0 + p->rx_tail_reg, i == 0 ? n - 1 : i - 1);
        mmio_read32(bar0 + p->flush_reg);
    }
    return got;
}

/* As E1000.send_buffers: reclaim what was sent (back to the pool), queue as many of
 * `frames` as fit with one tail write; the rest go back to the pool, counted as drops. */
static u32 fwd_send(struct proxy_nic_forward *p, struct proxy_nic_port *port, u64 bar0,
                    const struct fwd_frame *frames, u32 count)
{
    u32 n = port->tx_entries, tail = port->tx_tail, clean = port->tx_clean;
    while (clean != tail) {
        u8 *d = (u8 *)(unsigned long)(port->tx_ring + (u64)clean * DESC);
        if (!(*(volatile u8 *)(d + DESC_STATUS) & STATUS_DD))
            break;
        pool_push(p, *(volatile u64 *)(d + DESC_ADDR));
        clean = clean + 1 == n ? 0 : clean + 1;
    }
    u32 free = clean > tail ? clean - tail - 1 : clean + n - tail - 1;
    u32 sent = count < free ? count : free;
    for (u32 k = 0; k < sent; k++) {
        u8 *d = (u8 *)(unsigned long)(port->tx_ring + (u64)tail * DESC);
        *(volatile u64 *)(d + DESC_ADDR) = frames[k].buffer;
        *(volatile u16 *)(d + DESC_LEN) = (u16)frames[k].len;
        *(volatile u8 *)(d + DESC_CMD) = TX_CMD;
        *(volatile u8 *)(d + DESC_STATUS) = 0;
        tail = tail + 1 == n ? 0 : tail + 1;
    }
    for (u32 k = sent; k < count; k++)
        pool_push(p, frames[k].buffer);
    if (sent)
        mmio_write32(bar0 + p->tx_tail_reg, tail);  /* TDT is not coalesced: no flush read */
    port->tx_tail = tail;
    port->tx_clean = clean;
    return sent;
}

/* Forward both ways until `count` frames have gone through: each round takes a batch
 * from each NIC's receive ring and queues it on the other's transmit ring. Quiet for a
 * millisecond, it restates the receive tails, as the Python bridge does when idle. */
u16 native_forward(struct proxy_nic_forward *p, const struct window *dma, const u64 bar0[2],
                   volatile u32 *progress)
{
    static struct fwd_frame frames[PROXY_NIC_FORWARD_BATCH];     /* 4 KiB: off the 16 KiB stack */
    u64 start = rdtsc(), deadline = start + p->timeout_us * tsc_hz / 1000000;
    u64 idle = tsc_hz / 1000, last = start;
    while (p->done < p->count) {
        u32 moved = 0;
        for (int w = 0; w < 2; w++) {
            struct proxy_nic_port *src = &p->ports[w], *dst = &p->ports[1 - w];
            int got = fwd_receive(p, src, dma, bar0[w], frames);
            if (got < 0)
                return PROXY_STATUS_DENIED;
            if (!got)
                continue;
            u32 sent = fwd_send(p, dst, bar0[1 - w], frames, (u32)got);
            src->forwarded += sent;
            src->dropped += (u32)got - sent;
            p->done += sent;
            moved += (u32)got;
        }
        *progress = p->done;
        u64 now = rdtsc();
        if (moved) {
            last = now;
            continue;
        }
        if (now > deadline)
            break;
        if (now - last > idle) {
            for (int w = 0; w < 2; w++) {
                u32 i = p->ports[w].rx_next, n = p->ports[w].rx_entries;
                mmio_write32(bar0[w] + p->rx_tail_reg, i == 0 ? n - 1 : i - 1);
                mmio_read32(bar0[w] + p->flush_reg);
            }
            last = rdtsc();
        }
    }
    return p->done >= p->count ? PROXY_STATUS_OK : PROXY_STATUS_TIMEOUT;
}

/* ---- AHCI (Serial ATA AHCI 1.3.1): the port's command list, driven from C ---- */

#define PX_IS 0x10
#define PX_TFD 0x20
#define PX_SACT 0x34
#define PX_CI 0x38
#define PXIS_SDBS 0x00000008u           /* Set Device Bits FIS: NCQ completions */
#define PXIS_ERRORS 0x7dc00000u
#define TFD_ERR 0x01
#define CMD_TABLE_PRDT 0x80

/* The register H2D FIS (SATA 3.3 10.5.5), as H2DFis in drivers/ahci/regs.py declares it.
 * The loop does not build it: the host lays out each slot's command with the driver's
 * own code (Port.lay_out_read: command, sector count, NCQ tag), so both sides send the
 * same FIS, and the loop changes only its LBA. */
struct h2d_fis {
    u8 type, flags, command, features;
    u8 lba0, lba1, lba2, device;
    u8 lba3, lba4, lba5, features_exp;
    u16 count;
    u8 icc, control;
    u32 reserved;
} __attribute__((packed));
_Static_assert(sizeof(struct h2d_fis) == 20, "the H2D FIS is five dwords");

/* Slot `slot` reads request `rq`: the FIS's LBA, the PRD's address, PRDBC cleared. */
static int build(const struct proxy_disk_loop *p, const struct window *dma, u32 slot,
                 const struct proxy_disk_request *rq)
{
    volatile u32 *t = (volatile u32 *)(unsigned long)(p->tables + (u64)slot * p->table_size);
    volatile struct h2d_fis *fis = (volatile struct h2d_fis *)t;
    u64 lba = rq->lba, phys = rq->phys;
    if (!in_window(dma, phys, (u64)p->sectors * 512))
        return 0;
    fis->lba0 = (u8)lba;
    fis->lba1 = (u8)(lba >> 8);
    fis->lba2 = (u8)(lba >> 16);
    fis->lba3 = (u8)(lba >> 24);
    fis->lba4 = (u8)(lba >> 32);
    fis->lba5 = (u8)(lba >> 40);
    t[CMD_TABLE_PRDT / 4] = (u32)phys;
    t[CMD_TABLE_PRDT / 4 + 1] = (u32)(phys >> 32);
    *(volatile u32 *)(unsigned long)(p->command_list + slot * 32 + 4) = 0;     /* PRDBC */
    return 1;
}

/* Queue depth 1, as Port.read_into: write PxCI, poll it, read PxIS and PxTFD. */
static u16 disk_one_by_one(struct proxy_disk_loop *p, const struct window *dma, u64 port, u64 deadline,
                           volatile u32 *progress)
{
    const struct proxy_disk_request *rq = (const struct proxy_disk_request *)(unsigned long)p->requests;
    for (u32 i = 0; i < p->count; i++) {
        if (!build(p, dma, 0, &rq[i]))
            return PROXY_STATUS_DENIED;
        mmio_write32(port + PX_CI, 1);
        while (mmio_read32(port + PX_CI) & 1)
            if (rdtsc() > deadline)
                return PROXY_STATUS_TIMEOUT;
        u32 is = mmio_read32(port + PX_IS), tfd = mmio_read32(port + PX_TFD);
        if (is & PXIS_ERRORS || tfd & TFD_ERR) {
            p->errors++;                            /* the host sees done < count and recovers the port */
            return PROXY_STATUS_OK;
        }
        *progress = p->done = i + 1;
    }
    return PROXY_STATUS_OK;
}

/* NCQ, as Port._queued's rounds: issue every free tag (PxSACT, then PxCI), poll
 * PxIS until a Set Device Bits FIS or an error, clear it, read PxSACT and PxTFD. */
static u16 disk_queued(struct proxy_disk_loop *p, const struct window *dma, u64 port, u64 deadline,
                       volatile u32 *progress)
{
    const struct proxy_disk_request *rq = (const struct proxy_disk_request *)(unsigned long)p->requests;
    u32 free = p->depth == 32 ? ~0u : (1u << p->depth) - 1, in_flight = 0, issued = 0, done = 0;
    while (done < p->count) {
        u32 fresh = 0;
        while (free && issued < p->count) {
            u32 slot = (u32)__builtin_ctz(free);
            if (!build(p, dma, slot, &rq[issued++]))
                return PROXY_STATUS_DENIED;
            free &= free - 1;
            fresh |= 1u << slot;
        }
        if (fresh) {
            mmio_write32(port + PX_SACT, fresh);
            mmio_write32(port + PX_CI, fresh);
            in_flight |= fresh;
        }
        while (!(mmio_read32(port + PX_IS) & (PXIS_SDBS | PXIS_ERRORS)))
            if (rdtsc() > deadline)
                return PROXY_STATUS_TIMEOUT;
        mmio_write32(port + PX_IS, ~PXIS_ERRORS);
        u32 active = mmio_read32(port + PX_SACT), tfd = mmio_read32(port + PX_TFD);
        if (tfd & TFD_ERR) {
            p->errors++;
            return PROXY_STATUS_OK;
        }
        u32 finished = in_flight & ~active;
        in_flight &= active;
        free |= finished;
        for (; finished; finished &= finished - 1)     /* one per finished tag; no libgcc here */
            done++;
        *progress = p->done = done;
    }
    return PROXY_STATUS_OK;
}

u16 native_disk_read(struct proxy_disk_loop *p, const struct window *dma, u64 bar, volatile u32 *progress)
{
    u64 deadline = rdtsc() + p->timeout_us * tsc_hz / 1000000;
    if (!in_window(dma, p->requests, (u64)p->count * sizeof(struct proxy_disk_request)))
        return PROXY_STATUS_DENIED;
    p->done = p->errors = 0;
    u64 port = bar + p->port_offset;
    return p->depth > 1 ? disk_queued(p, dma, port, deadline, progress)
                        : disk_one_by_one(p, dma, port, deadline, progress);
}

/* ---- NVMe (NVM Express Base 1.4): queue pairs in the channel's DMA domain, driven from C ---- */

#define NVME_PAGE 4096u
#define SQE_BYTES 64
#define CQE_BYTES 16

/* Command identifier `cid` of queue q reads or writes request r: its submission entry
 * at the tail by words (4.2), PRP2 the second page or the cid's PRP list (4.3). */
static int nvme_submit(const struct proxy_nvme_loop *p, const struct window *dma, struct proxy_nvme_queue *q,
                       u32 cid, const struct proxy_disk_request *r)
{
    u64 bytes = (u64)p->blocks * p->block_size, phys = r->phys, prp2 = 0;
    u32 pages = (u32)((bytes + NVME_PAGE - 1) / NVME_PAGE);
    if (!in_window(dma, phys, bytes) || phys % NVME_PAGE)
        return 0;
    if (pages == 2) {
        prp2 = phys + NVME_PAGE;
    } else if (pages > 2) {
        volatile u64 *list = (volatile u64 *)(unsigned long)(q->prp_lists + (u64)cid * NVME_PAGE);
        for (u32 i = 1; i < pages; i++)
            list[i - 1] = phys + (u64)i * NVME_PAGE;
        prp2 = q->prp_lists + (u64)cid * NVME_PAGE;
    }
    volatile u32 *e = (volatile u32 *)(unsigned long)(q->sq + (u64)q->tail * SQE_BYTES);
    e[0] = p->opcode | cid << 16;
    e[1] = p->nsid;
    e[2] = e[3] = e[4] = e[5] = 0;
    e[6] = (u32)phys; e[7] = (u32)(phys >> 32);
    e[8] = (u32)prp2; e[9] = (u32)(prp2 >> 32);
    e[10] = (u32)r->lba; e[11] = (u32)(r->lba >> 32);
    e[12] = p->blocks - 1;
    e[13] = e[14] = e[15] = 0;
    q->tail = q->tail + 1 == q->entries ? 0 : q->tail + 1;
    return 1;
}

/* Reap every completion the controller has posted; returns how many, counting errors. */
static u32 nvme_reap(struct proxy_nvme_queue *q, u64 *free, u32 *errors)
{
    u32 n = 0;
    for (;;) {
        volatile u16 *status = (volatile u16 *)(unsigned long)(q->cq + (u64)q->head * CQE_BYTES + 14);
        u16 st = *status;
        if ((st & 1) != q->phase)
            return n;
        u16 cid = *(volatile u16 *)(unsigned long)(q->cq + (u64)q->head * CQE_BYTES + 12);
        if (st >> 1)
            (*errors)++;
        *free |= 1ull << (cid & 63);
        q->head = q->head + 1 == q->entries ? 0 : q->head + 1;
        if (q->head == 0)
            q->phase ^= 1;
        n++;
    }
}

u16 native_nvme(struct proxy_nvme_loop *p, const struct window *dma, u64 bar, volatile u32 *progress)
{
    const struct proxy_disk_request *rq = (const struct proxy_disk_request *)(unsigned long)p->requests;
    u64 deadline = rdtsc() + p->timeout_us * tsc_hz / 1000000;
    u64 free[PROXY_NVME_MAX_QUEUES];
    u32 in_flight[PROXY_NVME_MAX_QUEUES], next[PROXY_NVME_MAX_QUEUES];
    u32 done = 0;
    for (u32 k = 0; k < p->nqueues; k++) {
        free[k] = p->queues[k].depth == 64 ? ~0ull : (1ull << p->queues[k].depth) - 1;
        in_flight[k] = 0;
        next[k] = k;                    /* queue k runs requests k, k + nqueues, ... */
    }
    p->done = p->errors = 0;
    while (done < p->count) {
        for (u32 k = 0; k < p->nqueues; k++) {   /* each queue: fill its free identifiers, one ring */
            struct proxy_nvme_queue *q = &p->queues[k];
            u32 fresh = 0;
            while (free[k] && next[k] < p->count) {
                u32 cid = (u32)__builtin_ctzll(free[k]);
                if (!nvme_submit(p, dma, q, cid, &rq[next[k]]))
                    return PROXY_STATUS_DENIED;
                free[k] &= free[k] - 1;
                next[k] += p->nqueues;
                fresh++;
            }
            in_flight[k] += fresh;
            u32 unacked = (q->head + q->entries - q->acked) % q->entries;
            if (fresh || unacked + in_flight[k] > q->entries - 1) {
                if (q->cq_shadow) {             /* the controller reads the values here */
                    *(volatile u32 *)(unsigned long)q->cq_shadow = q->head;
                    *(volatile u32 *)(unsigned long)q->sq_shadow = q->tail;
                }
                mmio_write32(bar + q->cq_doorbell, q->head);
                mmio_write32(bar + q->sq_doorbell, q->tail);
                q->acked = q->head;
            }
        }
        u32 reaped = 0;
        while (!reaped) {                       /* until some queue has completions */
            for (u32 k = 0; k < p->nqueues; k++) {
                u32 n = nvme_reap(&p->queues[k], &free[k], &p->errors);
                in_flight[k] -= n;
                reaped += n;
            }
            if (!reaped && rdtsc() > deadline)
                return PROXY_STATUS_TIMEOUT;
        }
        done += reaped;
        *progress = p->done = done;
    }
    return PROXY_STATUS_OK;
}
