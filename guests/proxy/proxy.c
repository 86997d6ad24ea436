/*
 * proxy.c - the proxy proper: channels, grants, and the request loop.
 *
 * Everything the host writes is untrusted: a request is copied out of the
 * ring before it is checked (so the host cannot change it between check and
 * use), and grants and the device table live in guest-private memory.
 *
 * Channels are numbered across windows: the control window's rings are
 * channels 0..PROXY_MAX_CHANNELS-1, driver slot s's rings k are channel
 * PROXY_MAX_CHANNELS + (s - 1) * PROXY_SLOT_CHANNELS + k. A driver process
 * sees only its slot's window, so it can reach only what its channels hold.
 */
#define PROXY_ABI_TABLES                /* abi.h's tables are defined here */
#include "kernel.h"
#include "vectors.h"

#define READ_ONCE(x) (*(volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *)&(x) = (v))
/* Off the request loop's path: admin, interrupt setup, polls, the native loops. Inlined,
 * their frames and registers made every request's serve() save and restore more, and
 * under an emulating hypervisor each of those instructions costs. */
#define OFF_HOT_PATH __attribute__((noinline))

#define IVSHMEM_VENDOR 0x1af4
#define IVSHMEM_DEVICE 0x1110
#define IVSHMEM_DOORBELL 12
#define MAX_WINDOWS 8
#define RTC_INDEX 0x70
#define RTC_NMI_DISABLE 0x80

struct channel {
    int open;
    const struct proxy_pci_device *device;     /* NULL for an ISA channel */
    struct window mmio[MAX_WINDOWS], pio[MAX_WINDOWS];
    struct window mmio_readonly[2];             /* MSI-X table: an MSI is a DMA write */
    struct window cfg_readonly[4];              /* abi.h's proxy_readonly_config: BARs, ROM, MSI address and data */
    int nmmio, npio, nmmio_readonly, ncfg_readonly;
    struct window dma;                          /* the device's DMA domain (IOVA = guest-physical) */
    u64 isa_base, isa_ports;                    /* ISA: bit n of isa_ports grants port isa_base + n */
    u64 isa_irqs;                               /* ISA: the IRQs of the devices whose ports it holds */
    u32 faults_reported;                        /* dma_faults[c].count the host has been told of */
    u32 served;                                 /* private copy; the ring's is only a report */
    u32 end;                                    /* the publication being served ends here (== served: none) */
    u16 failed, first;                          /* a batch that yielded its turn: a request of it failed; */
                                                /* what its next request is told */
    u32 generation;                             /* new at every open and close */
};

/* One ivshmem window: the control window (0) or driver slot n. */
struct shared_window {
    struct proxy_shared *win;                   /* NULL: the machine has no such slot */
    struct proxy_window_hot *hot;               /* its hot page: win->hot[p] for window p (abi.h) */
    const struct proxy_pci_device *dev;         /* its ivshmem device: never granted */
    u64 doorbell;
};

struct proxy_shared *shared;                    /* the control window */
static const struct proxy_pci_device *devices;
static int ndevices;
static struct shared_window windows[1 + PROXY_MAX_SLOTS];
static struct channel channels[PROXY_TOTAL_CHANNELS];
static u64 turn_ticks;                          /* PROXY_TURN_US in TSC ticks */
static u32 generations;                         /* for channel.generation */
static int polling = -1;                        /* the channel whose poll lends its turn, or -1 */
/*
 * The windows the loop looks at: bit p while window p holds an open channel (the
 * control window's admin channel never closes). Only the owner opens and closes
 * channels, so a slot nobody was lent a device in is never scanned, served, flagged
 * asleep or lent a turn: what its holder writes there costs the proxy nothing, and
 * requests on its rings go unanswered until a channel opens there.
 */
static u32 serving;
static u64 served_total;                        /* requests executed: the window's copy is updated at wake-ups */
static u32 served_since;                        /* channels served since the idle loop last halted (bit c) */
static u32 sleeps;                              /* the idle loop's halts: each announced by its number
                                                 * (not a local of proxy_loop: one costs its idle pass
                                                 * 8 instructions, bench instructions' turn_resume) */
static u32 open_rings[1 + PROXY_MAX_SLOTS];     /* per window: bit k while its ring k's channel is open */
static struct proxy_ring *ring_at[PROXY_TOTAL_CHANNELS];   /* channel c's ring, in a window the machine has */

static int window_number(int c) { return c < PROXY_MAX_CHANNELS ? 0 : 1 + (c - PROXY_MAX_CHANNELS) / PROXY_SLOT_CHANNELS; }
static int ring_of(int c) { return c < PROXY_MAX_CHANNELS ? c : (c - PROXY_MAX_CHANNELS) % PROXY_SLOT_CHANNELS; }
static int first_channel(int p) { return p ? PROXY_MAX_CHANNELS + (p - 1) * PROXY_SLOT_CHANNELS : 0; }
static int nchannels(int p) { return p ? PROXY_SLOT_CHANNELS : PROXY_MAX_CHANNELS; }
static struct proxy_shared *window_of(int c) { return windows[window_number(c)].win; }
static struct proxy_window_hot *hot_of(int c) { return windows[window_number(c)].hot; }

static void set_open(int c)
{
    int p = window_number(c);
    channels[c].open = 1;
    open_rings[p] |= 1u << ring_of(c);
    serving |= 1u << p;
}

static void set_closed(int c)
{
    int p = window_number(c);
    if (!channels[c].open)
        return;
    channels[c].open = 0;
    open_rings[p] &= ~(1u << ring_of(c));
    if (!open_rings[p])
        serving &= ~(1u << p);
}

/* Ports no ISA channel may hold: abi.h says which and why. */
static const u32 reserved_ports[] = {
    PROXY_RESERVED_ISA_DMA_CONTROLLER_1, PROXY_RESERVED_INTERRUPT_CONTROLLER_1,
    PROXY_RESERVED_INTERRUPT_ROUTING_IMCR, PROXY_RESERVED_TIMER_THE_PROXY_USES,
    PROXY_RESERVED_TIMER_GATE_AND_NMI_STATUS, PROXY_RESERVED_ISA_DMA_PAGE_REGISTERS,
    PROXY_RESERVED_FAST_A20_AND_RESET, PROXY_RESERVED_INTERRUPT_CONTROLLER_2, PROXY_RESERVED_APM_CONTROL_SMI,
    PROXY_RESERVED_ISA_DMA_CONTROLLER_2, PROXY_RESERVED_THE_PROXY_CONSOLE, PROXY_RESERVED_EDGE_LEVEL_CONTROL,
    PROXY_RESERVED_FW_CFG_WHICH_CAN_DMA, PROXY_RESERVED_ACPI_POWER_MANAGEMENT,
    PROXY_RESERVED_PCI_CONFIGURATION_AND_RESET,
};

static int reserved_port(u64 port)
{
    for (unsigned i = 0; i < ARRAY_SIZE(reserved_ports); i++)
        if (port >= reserved_ports[i] >> 16 && port < (reserved_ports[i] >> 16) + (reserved_ports[i] & 0xffff))
            return 1;
    return 0;
}

static int overlaps(u64 a, u64 alen, u64 b, u64 blen)
{
    return a < b + blen && b < a + alen;
}

static int inside(const struct window *w, int n, u64 addr, u64 width)
{
    for (int i = 0; i < n; i++)
        if (addr >= w[i].base && addr - w[i].base <= w[i].size - width && width <= w[i].size)
            return 1;
    return 0;
}

static int any_overlap(const struct window *w, int n, u64 addr, u64 width)
{
    for (int i = 0; i < n; i++)
        if (overlaps(addr, width, w[i].base, w[i].size))
            return 1;
    return 0;
}

/*
 * Wake the host if it sleeps on doorbell `vector`, once per sleep: the ring
 * takes the host's flag down, so the rest of a burst (interrupts, a long
 * batch's steps) only counts until the host has looked and, still waiting,
 * raises the flag again. Down before the ring: a ring always follows, so a
 * host that raised it again in between still wakes. Each ring and each
 * channel's interrupts have their own vector (eventfd on the host), so one
 * waiter never swallows another's wake-up.
 */
static void wake(const struct shared_window *p, u32 vector)
{
    mfence();                           /* our results before we read its flag */
    if (p->win && vector < PROXY_DOORBELL_VECTORS && READ_ONCE(p->hot->host_sleeping[vector])) {
        WRITE_ONCE(p->hot->host_sleeping[vector], 0);
        mmio_write32(p->doorbell, PROXY_HOST_PEER << 16 | vector);
    }
}

/* Channel c's interrupt vector v: its counter, and the doorbell of whoever waits on it. */
IRQ_PATH struct proxy_irq *proxy_irq_slot(int c, u32 v)
{
    return &hot_of(c)->irqs[ring_of(c) * PROXY_IRQ_VECTORS + v];
}

IRQ_PATH void proxy_wake_irq(int c, u32 v)
{
    wake(&windows[window_number(c)], PROXY_DOORBELL_IRQ_BASE + (u32)ring_of(c) * PROXY_IRQ_VECTORS + v);
}

/* The proxy crashed (trap.c wrote the record into the control window): every window says
 * so, but only the owner's holds the record (its registers and stack could show another
 * slot's requests). */
void proxy_crashed(void)
{
    for (int p = 0; p <= PROXY_MAX_SLOTS; p++) {
        struct proxy_shared *w = windows[p].win;
        if (!w)
            continue;
        mfence();
        w->state = PROXY_STATE_CRASHED;
        for (u32 v = 0; v < PROXY_DOORBELL_VECTORS; v++)
            wake(&windows[p], v);         /* whoever waits, on whatever */
    }
}

/* ---- granting ---- */

/* What entry `seq`'s `published` holds once the host has published from it on (abi.h). */
static inline u32 mark(u32 seq)
{
    return ~(seq / PROXY_RING_ENTRIES);
}

/* Has the host published entries from `seq` of ring r on? */
static inline int published(const struct proxy_ring *r, u32 seq)
{
    return READ_ONCE(r->entries[seq % PROXY_RING_ENTRIES].published) == mark(seq);
}

/* How many entries from `seq` of ring r the host has published, 0 if none: a count out
 * of range publishes the first entry alone, and `first` becomes what it is told. */
static inline u32 publication(const struct proxy_ring *r, u32 seq, u16 *first)
{
    const volatile u64 *words = (const volatile u64 *)&r->entries[seq % PROXY_RING_ENTRIES];
    u64 word = words[__builtin_offsetof(struct proxy_request, published) / 8];   /* published, count */
    if ((u32)word != mark(seq))
        return 0;
    u32 count = (u32)(word >> 32);
    if (count - 1 < PROXY_RING_ENTRIES)
        return count;
    *first = PROXY_STATUS_BAD_REQUEST;
    return 1;
}

/* Channel c's ring, taken up where the guest last left it, past whatever a last owner
 * published there and the guest never served (the channel was closed first), the rest of
 * a batch that was waiting for its next turn included: the new owner starts at the
 * `served` this reports. */
static u32 skip_published(int c)
{
    struct proxy_ring *r = ring_at[c];
    const struct channel *ch = &channels[c];
    u32 served = ch->served != ch->end ? ch->end : READ_ONCE(r->served), count;
    u16 ignored;
    for (u32 n = 0; n < PROXY_RING_ENTRIES && (count = publication(r, served, &ignored)); n += count)
        served += count;
    WRITE_ONCE(r->served, served);
    return served;
}

/* Channel c, cleared for a new owner: no grants, no faults of the last one's device,
 * nothing stale in its ring. */
static struct channel *fresh_channel(int c)
{
    u32 served = skip_published(c);
    memset(&channels[c], 0, sizeof(channels[c]));
    channels[c].generation = ++generations;
    memset(&hot_of(c)->dma_faults[ring_of(c)], 0, sizeof(struct proxy_dma_fault));
    channels[c].served = channels[c].end = served;
    WRITE_ONCE(ring_at[c]->idle_spin_us, PROXY_IDLE_SPIN_US);
    return &channels[c];
}

/* Window p as the host named it, if the machine has it (-1: not). */
static int window_at(u64 p)
{
    return p <= PROXY_MAX_SLOTS && windows[p].win ? (int)p : -1;
}

/* A free channel in window p, one the machine has (the control window's channel 0 is the admin's). */
static int free_channel(int p)
{
    for (int c = first_channel(p) + (p == 0); c < first_channel(p) + nchannels(p); c++)
        if (!channels[c].open)
            return c;
    return -1;
}

static int is_window_device(const struct proxy_pci_device *d)
{
    for (int p = 0; p <= PROXY_MAX_SLOTS; p++)
        if (windows[p].dev == d)
            return 1;
    return 0;
}

static void grant_config_fields(struct channel *ch, const struct proxy_pci_device *d)
{
    u8 header = (d->header_type & PROXY_PCI_HEADER_LAYOUT) == PROXY_PCI_HEADER_BRIDGE
        ? PROXY_PCI_HEADER_BRIDGE : PROXY_PCI_HEADER_NORMAL;
    for (unsigned f = 0; f < ARRAY_SIZE(proxy_readonly_config); f++) {
        const struct proxy_config_field *field = &proxy_readonly_config[f];
        for (int i = 0; field->cap ? i < d->ncaps : i == 0; i++) {
            u32 base = field->cap ? d->caps[i].offset : 0;
            if ((field->cap ? d->caps[i].id == field->cap : field->header == header)
                && ch->ncfg_readonly < (int)ARRAY_SIZE(ch->cfg_readonly))
                ch->cfg_readonly[ch->ncfg_readonly++] = (struct window){ base + field->offset, field->size };
        }
    }
    u64 msix_table = pci_msix_table(d);
    if (msix_table)
        ch->mmio_readonly[ch->nmmio_readonly++] =
            (struct window){ msix_table, PROXY_PCI_MSIX_ENTRY_SIZE * (u64)pci_msix_entries(d) };
}

/* Does [addr, addr + len) lie inside window p's DMA pool? Its domains are carved from it. */
static int in_pool(int p, u64 addr, u64 len)
{
    const struct proxy_bar *bar2 = &windows[p].dev->bars[2];
    u64 pool = bar2->base + PROXY_DMA_OFFSET, end = bar2->base + bar2->size;
    return addr >= pool && addr <= end && len <= end - addr;
}

/* A device's DMA domain: whole pages of window p's pool that no open channel's domain overlaps. */
static int valid_domain(int p, u64 base, u64 size)
{
    if (!size)
        return 1;
    if (base % PROXY_DOMAIN_ALIGN || size % PROXY_DOMAIN_ALIGN || size > PROXY_DOMAIN_MAX
        || !in_pool(p, base, size))
        return 0;
    for (int c = 1; c < PROXY_TOTAL_CHANNELS; c++)
        if (channels[c].open && channels[c].dma.size && overlaps(base, size, channels[c].dma.base, channels[c].dma.size))
            return 0;
    return 1;
}

/*
 * Open device bdf on a channel of window p, mapping DMA domain `dma` for it. A fresh
 * domain must overlap nobody's; a `shared` one is an open channel's of the same
 * window (checked when that channel opened), so only one driver's devices share.
 */
static u16 open_pci(int p, u64 bdf, struct window dma, int shared, u64 *out)
{
    const struct proxy_pci_device *d = NULL;
    for (int i = 0; i < ndevices; i++)
        if (((u64)devices[i].bus << 8 | (u64)devices[i].dev << 3 | devices[i].fn) == bdf)
            d = &devices[i];
    if (!d)
        return PROXY_STATUS_BAD_REQUEST;
    if (is_window_device(d) || (p != 0 && d->class_code == PROXY_PCI_CLASS_BRIDGE))
        return PROXY_STATUS_DENIED;     /* a slot's driver gets a device, not the chipset */
    for (int c = 1; c < PROXY_TOTAL_CHANNELS; c++)
        if (channels[c].open && channels[c].device == d)
            return PROXY_STATUS_DENIED;
    if (!shared && !valid_domain(p, dma.base, dma.size))
        return PROXY_STATUS_BAD_REQUEST;
    int c = free_channel(p);
    if (c < 0)
        return PROXY_STATUS_FAULT;
    u16 st = iommu_map(c, d->bus, (u8)(d->dev << 3 | d->fn), dma.base, dma.size);
    if (st != PROXY_STATUS_OK)
        return st;
    struct channel *ch = fresh_channel(c);
    ch->device = d;
    ch->dma = dma;
    for (int i = 0; i < PROXY_MAX_BARS; i++) {
        const struct proxy_bar *b = &d->bars[i];
        if (!b->size || !b->base)
            continue;
        if (b->is_io && b->base + b->size <= 0x10000)
            ch->pio[ch->npio++] = (struct window){ b->base, b->size };
        else if (!b->is_io && b->base + b->size <= 0x100000000ull)
            ch->mmio[ch->nmmio++] = (struct window){ b->base, b->size };
    }
    grant_config_fields(ch, d);
    set_open(c);
    *out = (u64)ring_of(c);
    return PROXY_STATUS_OK;
}

static u16 open_isa(int p, u64 base, u64 count, u64 grant, u64 irqs, u64 *out)
{
    if (count == 0 || count > PROXY_ISA_MAX_PORTS || base >= 0x10000 || base + count > 0x10000)
        return PROXY_STATUS_BAD_REQUEST;
    u64 all = count == 64 ? ~0ull : (1ull << count) - 1;
    grant = grant ? grant : all;
    if (grant & ~all)
        return PROXY_STATUS_BAD_REQUEST;
    for (u64 n = 0; n < count; n++) {
        if (!(grant >> n & 1))
            continue;
        u64 port = base + n;
        if (reserved_port(port))
            return PROXY_STATUS_DENIED;
        for (int i = 0; i < ndevices; i++)
            for (int b = 0; b < PROXY_MAX_BARS; b++)
                if (devices[i].bars[b].is_io && overlaps(port, 1, devices[i].bars[b].base, devices[i].bars[b].size))
                    return PROXY_STATUS_DENIED;
        for (int c = 1; c < PROXY_TOTAL_CHANNELS; c++) {
            const struct channel *o = &channels[c];
            if (o->open && !o->device && port >= o->isa_base && port - o->isa_base < 64
                && o->isa_ports >> (port - o->isa_base) & 1)
                return PROXY_STATUS_DENIED;
        }
    }
    int c = free_channel(p);
    if (c < 0)
        return PROXY_STATUS_FAULT;
    struct channel *ch = fresh_channel(c);
    ch->isa_base = base;
    ch->isa_ports = grant;
    ch->isa_irqs = irqs;
    set_open(c);
    *out = (u64)ring_of(c);
    return PROXY_STATUS_OK;
}

/* ---- executing ---- */

static u64 pio_read(u16 port, u8 width)
{
    return width == 1 ? inb(port) : width == 2 ? inw(port) : inl(port);
}

static void pio_write(u16 port, u8 width, u64 v)
{
    if (width == 1) outb(port, (u8)v);
    else if (width == 2) outw(port, (u16)v);
    else outl(port, (u32)v);
}

static u64 mmio_read(u64 a, u8 width)
{
    switch (width) {
    case 1: return mmio_read8(a);
    case 2: return mmio_read16(a);
    case 4: return mmio_read32(a);
    default: return mmio_read64(a);
    }
}

static void mmio_write(u64 a, u8 width, u64 v)
{
    switch (width) {
    case 1: mmio_write8(a, (u8)v); break;
    case 2: mmio_write16(a, (u16)v); break;
    case 4: mmio_write32(a, (u32)v); break;
    default: mmio_write64(a, v);
    }
}

/*
 * What each access op is, found with one load: under an emulating hypervisor
 * every compare in a chain of them costs about a microsecond.
 */
enum access_kind {
    ACCESS_PIO = 1, ACCESS_MMIO = 2, ACCESS_CFG = 4, ACCESS_DMA = 128,     /* the space */
    ACCESS_WRITE = 8, ACCESS_POLL = 16, ACCESS_CHANGE = 32, ACCESS_REPEAT = 64,
};

static const u8 access_kinds[PROXY_OP_DMA_POLL + 1] = {
    [PROXY_OP_PIO_READ] = ACCESS_PIO,
    [PROXY_OP_PIO_WRITE] = ACCESS_PIO | ACCESS_WRITE,
    [PROXY_OP_MMIO_READ] = ACCESS_MMIO,
    [PROXY_OP_MMIO_WRITE] = ACCESS_MMIO | ACCESS_WRITE,
    [PROXY_OP_CFG_READ] = ACCESS_CFG,
    [PROXY_OP_CFG_WRITE] = ACCESS_CFG | ACCESS_WRITE,
    [PROXY_OP_PIO_POLL] = ACCESS_PIO | ACCESS_POLL,
    [PROXY_OP_MMIO_POLL] = ACCESS_MMIO | ACCESS_POLL,
    [PROXY_OP_PIO_REPEAT] = ACCESS_PIO | ACCESS_REPEAT,
    [PROXY_OP_MMIO_REPEAT] = ACCESS_MMIO | ACCESS_REPEAT,
    [PROXY_OP_PIO_POLL_CHANGE] = ACCESS_PIO | ACCESS_POLL | ACCESS_CHANGE,
    [PROXY_OP_MMIO_POLL_CHANGE] = ACCESS_MMIO | ACCESS_POLL | ACCESS_CHANGE,
    [PROXY_OP_DMA_POLL] = ACCESS_DMA | ACCESS_POLL,
};

/* DMA memory is plain memory: read as such (mmio_read's accessors are volatile loads too). */
static u64 space_read(u8 kind, u64 addr, u8 width)
{
    return kind & ACCESS_PIO ? pio_read((u16)addr, width) : mmio_read(addr, width);
}

/* Check one access against the channel's grants; width and alignment first. */
static u16 check_access(const struct channel *ch, u8 kind, u64 addr, u8 width)
{
    u8 max_width = kind & (ACCESS_MMIO | ACCESS_DMA) ? 8 : 4;
    if (width == 0 || width > max_width || (width & (width - 1)) || (addr & (width - 1)))
        return PROXY_STATUS_BAD_REQUEST;
    if (kind & ACCESS_CFG) {
        if (addr >= 256)
            return PROXY_STATUS_BAD_REQUEST;
        if (!ch->device)
            return PROXY_STATUS_DENIED;
        if (kind & ACCESS_WRITE && any_overlap(ch->cfg_readonly, ch->ncfg_readonly, addr, width))
            return PROXY_STATUS_DENIED;
        return PROXY_STATUS_OK;
    }
    if (kind & ACCESS_PIO && ch->device)
        return inside(ch->pio, ch->npio, addr, width) ? PROXY_STATUS_OK : PROXY_STATUS_DENIED;
    if (kind & ACCESS_PIO) {                    /* an ISA channel: every byte's port granted */
        u64 bits = (1ull << width) - 1;
        return addr >= ch->isa_base && addr - ch->isa_base <= 64u - width
            && (ch->isa_ports >> (addr - ch->isa_base) & bits) == bits ? PROXY_STATUS_OK : PROXY_STATUS_DENIED;
    }
    if (kind & ACCESS_DMA)              /* a wait on what the device wrote: its own DMA domain only */
        return ch->device && in_window(&ch->dma, addr, width) ? PROXY_STATUS_OK : PROXY_STATUS_DENIED;
    if (!inside(ch->mmio, ch->nmmio, addr, width))
        return PROXY_STATUS_DENIED;
    if (kind & ACCESS_WRITE && any_overlap(ch->mmio_readonly, ch->nmmio_readonly, addr, width))
        return PROXY_STATUS_DENIED;
    return PROXY_STATUS_OK;
}

static void others_turn(int c);

/*
 * Read until (value & mask) == expect (or != for a CHANGE poll), or the timeout. Every
 * turn of waiting, the other rings are served (others_turn): one driver's long wait
 * does not stall the rest. If its channel is closed meanwhile (the owner revoked it),
 * the poll ends at once.
 */
OFF_HOT_PATH static u16 poll(int c, const struct proxy_request *rq, u8 kind, u64 *value)
{
    if (rq->timeout_us > PROXY_POLL_MAX_US)
        return PROXY_STATUS_BAD_REQUEST;
    u64 now = rdtsc(), deadline = now + rq->timeout_us * tsc_hz / 1000000, turn = now + turn_ticks;
    u32 generation = channels[c].generation;
    int until_change = (kind & ACCESS_CHANGE) != 0;
    for (;;) {
        *value = space_read(kind, rq->addr, rq->width);
        if (((*value & rq->mask) == rq->expect) != until_change)
            return PROXY_STATUS_OK;
        now = rdtsc();
        if (now >= deadline)
            return PROXY_STATUS_TIMEOUT;
        if (now >= turn) {
            others_turn(c);
            if (channels[c].generation != generation)
                return PROXY_STATUS_FAULT;
            turn = rdtsc() + turn_ticks;
        }
    }
}

OFF_HOT_PATH static u16 repeat(const struct proxy_request *rq, u8 kind, u64 *value)
{
    if (rq->value == 0 || rq->value > PROXY_REPEAT_MAX)
        return PROXY_STATUS_BAD_REQUEST;
    u64 start = rdtsc();
    for (u32 i = 0; i < (u32)rq->value; i++)
        space_read(kind, rq->addr, rq->width);
    *value = rdtsc() - start;
    return PROXY_STATUS_OK;
}

/* Revoke everything a channel was lent: its interrupt, bus mastering, its DMA domain. */
static void close_channel(struct channel *ch, int c)
{
    const struct proxy_pci_device *d = ch->device;
    irq_disable(c, d);
    if (d) {
        u32 cmd = pci_cfg_read(d->bus, d->dev, d->fn, PROXY_PCI_COMMAND, 2);
        pci_cfg_write(d->bus, d->dev, d->fn, PROXY_PCI_COMMAND, 2, cmd & ~PROXY_PCI_COMMAND_MASTER);
        iommu_unmap(d->bus, (u8)(d->dev << 3 | d->fn));
    }
    ch->dma = (struct window){ 0, 0 };
    set_closed(c);
    ch->generation = ++generations;
}

/* The IOMMU refused a DMA of device `source_id`: tell its channel (interrupts are off here). */
void proxy_dma_fault(u32 source_id, u64 addr, int write, u8 reason, u64 tsc)
{
    for (int c = 1; c < PROXY_TOTAL_CHANNELS; c++) {
        const struct proxy_pci_device *d = channels[c].device;
        if (channels[c].open && d && (u32)(d->bus << 8 | d->dev << 3 | d->fn) == source_id) {
            struct proxy_dma_fault *f = &hot_of(c)->dma_faults[ring_of(c)];
            f->source_id = (u16)source_id;
            f->addr = addr;
            f->write = (u8)write;
            f->reason = reason;
            f->tsc = tsc;
            barrier();
            f->count++;
            return;
        }
    }
    shared->unowned_dma_faults++;
}

/* The channel of window p's ring k, if that is one a host may name (-1: not). */
static int channel_at(u64 p, u64 k)
{
    if (window_at(p) < 0 || k >= (u64)nchannels((int)p) || (p == 0 && k == 0))
        return -1;
    return first_channel((int)p) + (int)k;
}

/* Publish window p's control page: what its holder reads before anything else. */
static void publish(int p)
{
    struct proxy_shared *w = windows[p].win;
    const struct proxy_bar *bar2 = &windows[p].dev->bars[2];
    memcpy(w->devices, devices, sizeof(w->devices));
    w->ndevices = (u32)ndevices;
    w->slot = (u32)p;
    w->tsc_hz = tsc_hz;
    w->window_phys = bar2->base;
    w->window_size = bar2->size;
    w->dma_offset = PROXY_DMA_OFFSET;
    w->iommu = (u32)iommu_present();
    w->abi_version = PROXY_ABI_VERSION;
    w->magic = PROXY_ABI_MAGIC;
    mfence();
    WRITE_ONCE(w->state, PROXY_STATE_READY);
    mfence();
}

OFF_HOT_PATH static u16 admin(int c, const struct proxy_request *rq, u64 *value)
{
    if (c != 0)
        return PROXY_STATUS_DENIED;
    int into = window_at(rq->expect), slot = rq->addr ? window_at(rq->addr) : -1;
    switch (rq->op) {
    case PROXY_OP_OPEN_PCI:
        if (into < 0)
            return PROXY_STATUS_BAD_REQUEST;
        return open_pci(into, rq->addr, (struct window){ rq->value, rq->mask }, 0, value);
    case PROXY_OP_OPEN_PCI_SHARED: {
        int with = into < 0 ? -1 : channel_at((u64)into, rq->value);
        if (with < 0 || !channels[with].open || !channels[with].device || !channels[with].dma.size)
            return PROXY_STATUS_BAD_REQUEST;
        return open_pci(into, rq->addr, channels[with].dma, 1, value);
    }
    case PROXY_OP_OPEN_ISA:
        if (into < 0)
            return PROXY_STATUS_BAD_REQUEST;
        return open_isa(into, rq->addr, rq->value & 0xffff, rq->mask, rq->value >> 16 & 0xffff, value);
    case PROXY_OP_CLOSE: {
        int target = channel_at(rq->expect, rq->addr);
        if (target < 0 || !channels[target].open)
            return PROXY_STATUS_BAD_REQUEST;
        close_channel(&channels[target], target);
        return PROXY_STATUS_OK;
    }
    case PROXY_OP_SLOT_REVOKE:
        if (slot <= 0)                  /* a slot: never the control window */
            return PROXY_STATUS_BAD_REQUEST;
        for (int t = first_channel(slot); t < first_channel(slot) + nchannels(slot); t++)
            if (channels[t].open)
                close_channel(&channels[t], t);
        return PROXY_STATUS_OK;
    case PROXY_OP_SLOT_READY:
        if (slot <= 0)                  /* a slot: never the control window */
            return PROXY_STATUS_BAD_REQUEST;
        publish(slot);
        return PROXY_STATUS_OK;
    case PROXY_OP_CRASH:
        if (rq->value != PROXY_CRASH_MAGIC || rq->addr > PROXY_CRASH_PANIC)
            return PROXY_STATUS_BAD_REQUEST;
        crash_on_purpose((u32)rq->addr);
        return PROXY_STATUS_FAULT;      /* not reached */
    }
    return PROXY_STATUS_BAD_REQUEST;
}

OFF_HOT_PATH static u16 interrupt_op(int c, const struct proxy_request *rq)
{
    const struct channel *ch = &channels[c];
    if (c == 0)
        return PROXY_STATUS_DENIED;
    switch (rq->op) {
    case PROXY_OP_IRQ_ENABLE:
        if (rq->addr == PROXY_IRQ_INTX)
            return ch->device ? irq_enable_intx(c, ch->device) : PROXY_STATUS_DENIED;
        if (rq->addr == PROXY_IRQ_MSI)
            return ch->device ? irq_enable_msi(c, ch->device, rq->value) : PROXY_STATUS_DENIED;
        if (rq->addr == PROXY_IRQ_MSIX)
            return ch->device ? irq_enable_msix(c, ch->device, rq->value) : PROXY_STATUS_DENIED;
        if (rq->addr == PROXY_IRQ_ISA)          /* only the IRQs of the devices whose ports it holds */
            return ch->device || rq->value & ~ch->isa_irqs ? PROXY_STATUS_DENIED : irq_enable_isa(c, rq->value);
        return PROXY_STATUS_BAD_REQUEST;
    case PROXY_OP_IRQ_ACK:
        return irq_ack(c);
    default:
        if (proxy_irq_slot(c, 0)->mode == PROXY_IRQ_NONE)
            return PROXY_STATUS_BAD_REQUEST;
        irq_disable(c, ch->device);
        return PROXY_STATUS_OK;
    }
}

/*
 * A native loop's parameter block: the channel must hold a PCI device with a memory
 * BAR, and the block lie in the device's DMA domain. It is copied to `copy` before it
 * is checked (the host could rewrite it); the loop reports progress in the original,
 * which is returned (NULL: refused).
 */
static void *loop_block(int c, const struct proxy_request *rq, void *copy, u32 size)
{
    const struct channel *ch = &channels[c];
    if (c == 0 || c >= PROXY_MAX_CHANNELS       /* the baselines hold the proxy: the owner's benches only */
        || !ch->device || !ch->nmmio || !in_window(&ch->dma, rq->addr, size) || rq->addr & 7)
        return NULL;
    memcpy(copy, (const void *)(unsigned long)rq->addr, size);
    return (void *)(unsigned long)rq->addr;
}

/* The native e1000 loops: the ring in the DMA domain too, tail and flush registers in the first memory BAR. */
OFF_HOT_PATH static u16 nic_loop(int c, const struct proxy_request *rq, u64 *value)
{
    const struct channel *ch = &channels[c];
    struct proxy_nic_loop p, *live = loop_block(c, rq, &p, sizeof(p));
    if (!live)
        return PROXY_STATUS_DENIED;
    const struct window *bar = &ch->mmio[0];
    if (p.entries < 8 || p.entries > 4096 || !in_window(&ch->dma, p.ring_phys, 16ull * p.entries)
        || p.tail_reg & 3 || p.flush_reg & 3 || p.tail_reg + 4 > bar->size || p.flush_reg + 4 > bar->size
        || p.next >= p.entries || p.clean >= p.entries || p.frame_len > 2048
        || (p.frame_phys && !in_window(&ch->dma, p.frame_phys, PROXY_NIC_SINK_BYTES))
        || (rq->op == PROXY_OP_NIC_TX_LOOP && !p.frame_phys)
        || p.zero_copy > 1 || (p.zero_copy && rq->op != PROXY_OP_NIC_TX_LOOP)
        || p.timeout_us > PROXY_POLL_MAX_US * 10ull)
        return PROXY_STATUS_BAD_REQUEST;
    live->done = 0;
    p.done = 0;
    u64 start = rdtsc();
    u16 st = rq->op == PROXY_OP_NIC_TX_LOOP ? native_tx(&p, &ch->dma, bar->base, &live->done)
                                            : native_rx(&p, &ch->dma, bar->base, &live->done);
    *value = rdtsc() - start;
    live->next = p.next;
    live->clean = p.clean;
    live->done = p.done;
    return st;
}

/*
 * The native bridge: the channel's NIC and the NIC of ring `peer` of the same window,
 * opened into one DMA domain (OPEN_PCI_SHARED); rings and pool in that domain, the
 * tail and flush registers in each NIC's first memory BAR.
 */
OFF_HOT_PATH static u16 forward_loop(int c, const struct proxy_request *rq, u64 *value)
{
    const struct channel *ch = &channels[c];
    struct proxy_nic_forward p, *live = loop_block(c, rq, &p, sizeof(p));
    if (!live)
        return PROXY_STATUS_DENIED;
    int other = channel_at((u64)window_number(c), p.peer);
    if (other < 0 || other == c || !channels[other].open || !channels[other].nmmio
        || channels[other].dma.base != ch->dma.base || channels[other].dma.size != ch->dma.size)
        return PROXY_STATUS_DENIED;
    const struct window *bars[2] = { &ch->mmio[0], &channels[other].mmio[0] };
    u64 bar0[2] = { bars[0]->base, bars[1]->base };
    for (int w = 0; w < 2; w++) {
        const struct proxy_nic_port *port = &p.ports[w];
        if (port->rx_entries < 8 || port->rx_entries > 4096 || port->tx_entries < 8 || port->tx_entries > 4096
            || !in_window(&ch->dma, port->rx_ring, 16ull * port->rx_entries)
            || !in_window(&ch->dma, port->tx_ring, 16ull * port->tx_entries)
            || port->rx_next >= port->rx_entries || port->tx_tail >= port->tx_entries
            || port->tx_clean >= port->tx_entries)
            return PROXY_STATUS_BAD_REQUEST;
        u32 regs[3] = { p.rx_tail_reg, p.tx_tail_reg, p.flush_reg };
        for (int r = 0; r < 3; r++)
            if (regs[r] & 3 || regs[r] + 4ull > bars[w]->size)
                return PROXY_STATUS_BAD_REQUEST;
    }
    if (p.batch < 1 || p.batch > PROXY_NIC_FORWARD_BATCH || p.pool_free > p.pool_size
        || !in_window(&ch->dma, p.pool, 8ull * p.pool_size) || p.timeout_us > PROXY_POLL_MAX_US * 10ull)
        return PROXY_STATUS_BAD_REQUEST;
    live->done = 0;
    p.done = 0;
    u64 start = rdtsc();
    u16 st = native_forward(&p, &ch->dma, bar0, &live->done);
    *value = rdtsc() - start;
    live->ports[0] = p.ports[0];        /* the rings' state and the pool go back to the Python driver */
    live->ports[1] = p.ports[1];
    live->pool_free = p.pool_free;
    live->done = p.done;
    return st;
}

/* The native disk loop: block, command list and tables in the DMA domain, the port in the HBA's BAR. */
OFF_HOT_PATH static u16 disk_loop(int c, const struct proxy_request *rq, u64 *value)
{
    const struct channel *ch = &channels[c];
    struct proxy_disk_loop p, *live = loop_block(c, rq, &p, sizeof(p));
    if (!live)
        return PROXY_STATUS_DENIED;
    const struct window *bar = &ch->mmio[ch->nmmio - 1];        /* the AHCI BAR is the last memory BAR */
    if (p.depth < 1 || p.depth > 32 || p.sectors < 1 || p.sectors > 65535 || p.table_size < 0x90
        || p.table_size & 127 || !in_window(&ch->dma, p.command_list, 32 * 32)
        || !in_window(&ch->dma, p.tables, (u64)p.table_size * p.depth)
        || p.port_offset & 3 || p.port_offset + 0x80 > bar->size
        || p.timeout_us > PROXY_POLL_MAX_US * 10ull)
        return PROXY_STATUS_BAD_REQUEST;
    live->done = 0;
    u64 start = rdtsc();
    u16 st = native_disk_read(&p, &ch->dma, bar->base, &live->done);
    *value = rdtsc() - start;
    live->done = p.done;
    live->errors = p.errors;
    return st;
}

/*
 * The native NVMe loop: the block, every queue, PRP list page and request list in the
 * channel's DMA domain; the doorbells inside the channel's BAR0 and outside its MSI-X table.
 */
OFF_HOT_PATH static u16 nvme_loop(int c, const struct proxy_request *rq, u64 *value)
{
    const struct channel *ch = &channels[c];
    struct proxy_nvme_loop p, *live = loop_block(c, rq, &p, sizeof(p));
    if (!live)
        return PROXY_STATUS_DENIED;
    const struct window *bar = &ch->mmio[0];
    u64 bytes = (u64)p.blocks * p.block_size;
    if (p.nqueues < 1 || p.nqueues > PROXY_NVME_MAX_QUEUES || (p.block_size != 512 && p.block_size != 4096)
        || p.blocks < 1 || bytes > 512ull * 4096 || (p.opcode != 1 && p.opcode != 2)
        || p.timeout_us > PROXY_POLL_MAX_US * 10ull
        || !in_window(&ch->dma, p.requests, (u64)p.count * sizeof(struct proxy_disk_request)))
        return PROXY_STATUS_BAD_REQUEST;
    for (u32 k = 0; k < p.nqueues; k++) {
        const struct proxy_nvme_queue *q = &p.queues[k];
        if (q->entries < 2 || q->entries > 4096 || q->depth < 1 || q->depth >= q->entries
            || q->depth > PROXY_NVME_MAX_DEPTH || q->tail >= q->entries || q->head >= q->entries
            || q->acked >= q->entries || q->phase > 1
            || !in_window(&ch->dma, q->sq, 64ull * q->entries) || !in_window(&ch->dma, q->cq, 16ull * q->entries)
            || (bytes > 2 * 4096 && !in_window(&ch->dma, q->prp_lists, 4096ull * q->depth))
            || ((q->sq_shadow || q->cq_shadow)
                && !(in_window(&ch->dma, q->sq_shadow, 4) && in_window(&ch->dma, q->cq_shadow, 4))))
            return PROXY_STATUS_BAD_REQUEST;
        u32 doorbells[2] = { q->sq_doorbell, q->cq_doorbell };
        for (int i = 0; i < 2; i++)
            if (doorbells[i] & 3 || doorbells[i] + 4ull > bar->size
                || any_overlap(ch->mmio_readonly, ch->nmmio_readonly, bar->base + doorbells[i], 4))
                return PROXY_STATUS_DENIED;
    }
    live->done = 0;
    u64 start = rdtsc();
    u16 st = native_nvme(&p, &ch->dma, bar->base, &live->done);
    *value = rdtsc() - start;
    for (u32 k = 0; k < p.nqueues; k++)     /* the queues' state goes back to the Python driver */
        live->queues[k] = p.queues[k];
    live->done = p.done;
    live->errors = p.errors;
    return st;
}

/* Bit 7 of the RTC index port masks NMIs for the whole machine: the proxy keeps it as it is (clear). */
static u64 rtc_keeps_nmi(u64 port, u8 width, u64 value)
{
    if (port <= RTC_INDEX && RTC_INDEX < port + width)
        value &= ~((u64)RTC_NMI_DISABLE << 8 * (RTC_INDEX - port));
    return value;
}

static u16 execute(int c, const struct proxy_request *rq, u64 *value)
{
    const struct channel *ch = &channels[c];
    u8 op = rq->op, width = rq->width;
    u64 addr = rq->addr;
    u8 kind = op < sizeof(access_kinds) ? access_kinds[op] : 0;
    if (!kind) {                                /* not an access: control and the baselines */
        if (op == PROXY_OP_NOP)
            return PROXY_STATUS_OK;
        if (op >= PROXY_OP_OPEN_PCI && op <= PROXY_OP_OPEN_PCI_SHARED)
            return admin(c, rq, value);
        if (op >= PROXY_OP_IRQ_ENABLE && op <= PROXY_OP_IRQ_DISABLE)
            return interrupt_op(c, rq);
        if (op == PROXY_OP_NIC_TX_LOOP || op == PROXY_OP_NIC_RX_LOOP)
            return nic_loop(c, rq, value);
        if (op == PROXY_OP_DISK_READ_LOOP)
            return disk_loop(c, rq, value);
        if (op == PROXY_OP_NVME_LOOP)
            return nvme_loop(c, rq, value);
        if (op == PROXY_OP_NIC_FORWARD_LOOP)
            return forward_loop(c, rq, value);
        return PROXY_STATUS_BAD_REQUEST;
    }
    u16 st = check_access(ch, kind, addr, width);
    if (st != PROXY_STATUS_OK)
        return st;
    if (kind & ACCESS_POLL)
        return poll(c, rq, kind, value);
    if (kind & ACCESS_REPEAT)           /* a timing loop that holds the proxy: the owner's benches only */
        return c < PROXY_MAX_CHANNELS ? repeat(rq, kind, value) : PROXY_STATUS_DENIED;
    if (kind & ACCESS_CFG) {
        const struct proxy_pci_device *d = ch->device;
        if (kind & ACCESS_WRITE)
            pci_cfg_write(d->bus, d->dev, d->fn, (u8)addr, width, (u32)rq->value);
        else
            *value = pci_cfg_read(d->bus, d->dev, d->fn, (u8)addr, width);
        return PROXY_STATUS_OK;
    }
    if (!(kind & ACCESS_WRITE))
        *value = space_read(kind, addr, width);
    else if (kind & ACCESS_PIO)
        pio_write((u16)addr, width, rtc_keeps_nmi(addr, width, rq->value));
    else
        mmio_write(addr, width, rq->value);
    return PROXY_STATUS_OK;
}

/* The words of a request the host writes: op through expect. */
#define REQUEST_WORDS (__builtin_offsetof(struct proxy_request, expect) / 8 + 1)

/* Has open channel c work: a publication's rest, or a new one? The loop's whole look at a ring. */
static inline int has_work(int c)
{
    const struct channel *ch = &channels[c];
    return ch->served != ch->end || published(ring_at[c], ch->served);
}

/* Take the publication at entry `seq` of open channel c's ring: how many entries it holds
 * (0: none is there). Its first request is told a DMA fault of the channel's device
 * since the last report (`first`), or that the count was bad. */
HOT_PATH static u32 take(int c, const struct proxy_ring *r, u32 seq, u16 *first)
{
    u32 count = publication(r, seq, first);
    if (count && c != 0) {
        struct channel *ch = &channels[c];
        u32 faults = READ_ONCE(hot_of(c)->dma_faults[ring_of(c)].count);
        if (faults != ch->faults_reported) {
            ch->faults_reported = faults;   /* told once, on the batch after the fault */
            *first = PROXY_STATUS_DMA_FAULT;
        }
    }
    return count;
}

/*
 * Execute what the host has published on open channel c (has_work): its publications in
 * order, or what a turn of PROXY_TURN_US leaves of them. A batch that outlasts its turn is
 * resumed on the loop's next pass, after every other ring has had its turn, so one
 * driver's long batch delays the others by a turn, not by all of it; a single request
 * still runs to its end (a poll for up to PROXY_POLL_MAX_US). Once a request of a batch
 * fails, the rest of it is skipped, across turns too. Returns 1.
 */
HOT_PATH static int serve(int c)
{
    struct proxy_ring *r = ring_at[c];
    struct channel *ch = &channels[c];
    served_since |= 1u << c;            /* the idle loop spins as long as it asks */
    /*
     * The batch's state lives in registers while it runs, stored back once: execute()
     * is a call, so state kept in *ch would be reloaded and stored around every request.
     * Only a poll can change the channel under us (others_turn, in which the owner may
     * close it): the generation is looked at after a request that is not a plain access.
     */
    u32 served = ch->served, end = ch->end, start = served, generation = ch->generation;
    u16 failed = ch->failed, first = ch->first;         /* a yielded batch's, resumed */
    struct proxy_request *entries = r->entries;
    if (served == end) {                /* a new publication, not a yielded batch's rest */
        failed = 0;
        first = PROXY_STATUS_OK;
        end = served + take(c, r, served, &first);
    }
    /*
     * One TSC read per request, after its copy, as its start_tsc (the ABI's "just before
     * the access"). The turn ends PROXY_TURN_US after the first request's: a request that
     * finds it over waits, copied again, for the next turn, but the first always runs.
     */
    u64 turn_end = 0;
    for (;;) {
        struct proxy_request *slot = &entries[served % PROXY_RING_ENTRIES];
        /* Take the request once (the host could rewrite it under us), by words:
         * under an emulating hypervisor every instruction here costs microseconds. */
        struct proxy_request rq;
        const volatile u64 *from = (const volatile u64 *)slot;
        u64 *to = (u64 *)&rq;
#pragma GCC unroll 8                    /* five loads and stores, not a loop's five branches */
        for (unsigned i = 0; i < REQUEST_WORDS; i++)
            to[i] = from[i];
        u64 value = 0, now = rdtsc();
        if (served == start)
            turn_end = now + turn_ticks;
        else if (now > turn_end)
            break;                      /* at least one, then the others' turn */
        slot->start_tsc = now;
        if (rq.status != PROXY_STATUS_CONTINUES)
            failed = 0;                 /* a batch of its own: an earlier batch's failure ends there */
        u16 status = PROXY_STATUS_SKIPPED;
        if (failed)
            ;
        else if (first != PROXY_STATUS_OK) {
            status = first;             /* told once: the batches after it run */
            first = PROXY_STATUS_OK;
        } else {
            status = execute(c, &rq, &value);
            if (rq.op >= PROXY_OP_PIO_POLL && ch->generation != generation)
                return 1;               /* closed while it polled: the ring is no longer its to write */
        }
        failed = status != PROXY_STATUS_OK;
        slot->value = value;
        barrier();
        WRITE_ONCE(slot->status, status);
        if (++served == end) {          /* the next publication, if it is there already */
            u32 more = take(c, r, served, &first);
            if (!more)
                break;
            end = served + more;
        }
    }
    ch->served = served;
    ch->end = end;
    ch->failed = failed;
    ch->first = first;
    served_total += served - start;
    WRITE_ONCE(r->served, served);
    wake(&windows[window_number(c)], (u32)ring_of(c));
    return 1;
}

/* Has the host published the next entry of an open channel in any of `which` (bit p: window p)? */
static int pending(u32 which)
{
    for (; which; which &= which - 1) {
        int p = __builtin_ctz(which);
        for (u32 m = open_rings[p]; m; m &= m - 1)
            if (has_work(first_channel(p) + __builtin_ctz(m)))
                return 1;
    }
    return 0;
}

/* Tell the holders of `which` windows that the guest sleeps (`sleep`: this halt's number; kick
 * it once) or is awake (0). */
static void set_sleeping(u32 which, u32 sleep)
{
    for (; which; which &= which - 1)
        WRITE_ONCE(windows[__builtin_ctz(which)].win->guest_sleeping, sleep);
}

/* Serve every open channel of window p whose next entry is published. Inline in the loop:
 * under TCG a call and its return (an indirect jump) cost more than the looks. */
static inline int serve_window(int p)
{
    int busy = 0;
    for (u32 m = open_rings[p]; m; m &= m - 1) {
        int c = first_channel(p) + __builtin_ctz(m);
        /* The polling one is mid-request: its ring waits. And one the admin channel closed
         * in this pass is not served: what its owner published after is never run. */
        if (c != polling && channels[c].open && has_work(c))
            busy |= serve(c);
    }
    return busy;
}

/* A turn for every other ring, lent by channel c's poll; a poll inside it lends none. */
static void others_turn(int c)
{
    if (polling >= 0)
        return;
    polling = c;
    for (u32 w = serving; w; w &= w - 1)
        serve_window(__builtin_ctz(w));
    polling = -1;
}

/*
 * Find the windows: every ivshmem-doorbell device, told apart by the slot
 * number the host wrote into its window before boot (0: the control window).
 * Each gets its MSI-X vector 0 for the host's kick.
 */
void proxy_init(const struct proxy_pci_device *table, int n)
{
    devices = table;
    ndevices = n;
    for (int i = 0; i < n; i++) {
        const struct proxy_pci_device *d = &table[i];
        if (d->vendor != IVSHMEM_VENDOR || d->device != IVSHMEM_DEVICE)
            continue;
        const struct proxy_bar *bar2 = &d->bars[2];
        if (bar2->base == 0 || bar2->base + bar2->size > 0x100000000ull)
            panic("proxy_init: an ivshmem BAR2 unassigned or above 4 GiB");
        if (bar2->size < PROXY_DMA_OFFSET)
            panic("proxy_init: an ivshmem window smaller than the control area");
        struct proxy_shared *w = (struct proxy_shared *)(unsigned long)bar2->base;
        u32 p = READ_ONCE(w->slot);
        if (p > PROXY_MAX_SLOTS || windows[p].win)
            panic("proxy_init: an ivshmem window with a bad or repeated slot number");
        if (pci_enable_msix(d, 0, VEC_KICK))
            panic("proxy_init: an ivshmem device without MSI-X");
        windows[p] = (struct shared_window){ w, &w->hot[p], d, d->bars[0].base + IVSHMEM_DOORBELL };
    }
    if (!windows[0].win)
        panic("proxy_init: no control window (an ivshmem-doorbell whose slot is 0)");
    shared = windows[0].win;
    for (int c = 0; c < PROXY_TOTAL_CHANNELS; c++)
        if (window_of(c))
            ring_at[c] = &window_of(c)->rings[c];
    channels[0].served = channels[0].end = skip_published(0);
    set_open(0);                                    /* the admin channel, for good */
    WRITE_ONCE(ring_at[0]->idle_spin_us, PROXY_IDLE_SPIN_US);
    turn_ticks = tsc_hz / 1000000 * PROXY_TURN_US;
    for (int p = PROXY_MAX_SLOTS; p >= 0; p--)       /* the control window last: READY means all are */
        if (windows[p].win)
            publish(p);
    kprintf("proxy: ready, control window %lx size %lx\n", windows[0].dev->bars[2].base, windows[0].dev->bars[2].size);
}

/* The idle loop's spin in us after a busy round: the longest that a channel served since it
 * last halted asks for. (A ring's ask shares no line with what the host writes in every
 * request: when it shared the submit index's, reading it cost each request 0.12-0.15 us.) */
static u32 asked_spin(void)
{
    _Static_assert(PROXY_TOTAL_CHANNELS <= 32, "served_since has a bit per channel");
    u32 most = 0;
    for (u32 m = served_since; m; m &= m - 1) {
        int c = __builtin_ctz(m);
        u32 asked = READ_ONCE(ring_at[c]->idle_spin_us);
        most = asked > most ? asked : most;
    }
    return most < PROXY_IDLE_SPIN_MAX_US ? most : PROXY_IDLE_SPIN_MAX_US;
}

/*
 * Spin while there is work; then spin on as long as the channels served since the
 * last halt ask (asked_spin), announce sleep, look once more, and halt until kicked. A driver
 * that issues commands back to back finds the loop up. A server whose requests come
 * when its clients send them (a Linux machine's QD1 reads through an NBD export,
 * 250-400 us apart under TCG) asks for no spin: each request then pays a kick
 * (QEMU's main loop, then the vCPU thread), and the 200 us spin it would not have
 * used goes to the threads the next request needs. On two cores such reads went
 * from 2,500-2,800 to 4,000 a second.
 */
HOT_PATH void proxy_loop(void)
{
    const u64 us = tsc_hz / 1000000;
    u64 idle_since = rdtsc(), spin = PROXY_IDLE_SPIN_US * us;  /* how long to look on after idle_since */
    sleeps = (u32)idle_since;               /* a guest booted again does not repeat a number a host kicked */
    sti();                                  /* the loop runs with interrupts on: they are forwarded */
    for (u32 round = 1;; round++) {
        int busy = 0;
        for (u32 w = serving; w; w &= w - 1)    /* the windows with an open channel */
            busy |= serve_window(__builtin_ctz(w));
        if (busy) {
            idle_since = rdtsc();
            spin = asked_spin() * us;
            continue;
        }
        /*
         * No pause here: under TCG it leaves the translated code, under KVM
         * it may exit. And the clock is read only every 8 rounds: under TCG
         * rdtsc is a helper call; under the emulating KVM 64 idle rounds take
         * about a millisecond, which made a 200 us spin one of 1 ms. A loop
         * asked for no spin halts at once.
         */
        if (spin && (round % 8 || rdtsc() - idle_since < spin))
            continue;
        /* Interrupts off between the last look and hlt: sti's shadow then covers hlt. */
        cli();
        u32 flagged = serving;              /* only windows the loop serves: nobody else gets a reply */
        if (++sleeps == 0)                  /* 0 says awake */
            sleeps = 1;
        set_sleeping(flagged, sleeps);
        mfence();
        if (!pending(flagged))
            sti_hlt();
        else
            sti();
        set_sleeping(flagged, 0);
        shared->kicks = kicks;
        shared->served_total = served_total;
        served_since = 0;
        idle_since = rdtsc();
        spin = PROXY_IDLE_SPIN_US * us;     /* a wake-up that brings no request: the default */
    }
}
