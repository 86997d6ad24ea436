/*
 * irq.c - interrupt controllers and the interrupt forwarding of the proxy.
 *
 * Every interrupt is recorded for the channels that own it (a count and the
 * TSC at handler entry, in shared memory) and the host is told if it sleeps.
 * A level-triggered line is masked at the IOAPIC until every channel on it
 * has acknowledged (Linux VFIO's "automasked" INTx); MSI and edge lines need
 * no mask. The request loop runs with interrupts on, so everything here that
 * the loop also touches is changed with interrupts off.
 */
#include "kernel.h"
#include "vectors.h"

#define LAPIC_PHYS 0xfee00000u
#define LAPIC_TPR 0x80
#define LAPIC_ISR 0x100                 /* in-service bits, 32 vectors per register, 16 bytes apart */
#define LAPIC_EOI 0xb0
#define LAPIC_SVR 0xf0
#define IOAPIC_PHYS 0xfec00000u
#define LAPIC_ALIAS_INDEX 0xf0          /* TLB indexes of their aliases (map_alias): free ones */
#define IOAPIC_ALIAS_INDEX 0xf1
#define IOAPIC_PINS 24
#define IOREDTBL_LEVEL (1u << 15)
#define IOREDTBL_MASKED (1u << 16)

struct line {
    u32 owners;                 /* channels attached to this IOAPIC input */
    u32 waiting;                /* channels that have not acked the current interrupt */
    int level;
};

static struct line lines[IOAPIC_PINS];
static int channel_mode[PROXY_TOTAL_CHANNELS];
static u32 channel_vectors[PROXY_TOTAL_CHANNELS]; /* MSI-X entries a channel took (MSI, INTx, ISA: 1) */
static u32 channel_pins[PROXY_TOTAL_CHANNELS];    /* IOAPIC inputs a channel owns (INTx, ISA) */
volatile u32 kicks;

/* Where the two are reached: their aliases once irq_init made them (map_alias says why). */
static u64 lapic = LAPIC_PHYS, ioapic = IOAPIC_PHYS;

static inline void irq_off(void) { asm volatile("cli" : : : "memory"); }
static inline void irq_on(void) { asm volatile("sti" : : : "memory"); }

/* The register IOREGSEL selects. Every writer other than the handler holds interrupts off,
 * so it is never stale: the ack's unmask and the next interrupt's mask skip the select. */
static u32 ioapic_selected = ~0u;

static void ioapic_write(u32 reg, u32 v)
{
    if (reg != ioapic_selected) {
        mmio_write32(ioapic, reg);
        ioapic_selected = reg;
    }
    mmio_write32(ioapic + 0x10, v);
}

/*
 * Program input `pin`: its own vector, active high (QEMU's PCI links are), to
 * APIC 0. The destination (the entry's high half) is written once, at boot;
 * masking and unmasking, on every level interrupt and every ack, rewrite only
 * the low half: two emulated MMIO writes instead of four.
 */
static void ioapic_route(u32 pin, int level, int masked)
{
    ioapic_write(0x10 + 2 * pin, (VEC_GSI_BASE + pin) | (level ? IOREDTBL_LEVEL : 0)
                 | (masked ? IOREDTBL_MASKED : 0));
}

void irq_init(void)
{
    lapic = map_alias(LAPIC_ALIAS_INDEX, LAPIC_PHYS);
    ioapic = map_alias(IOAPIC_ALIAS_INDEX, IOAPIC_PHYS);
    mmio_write32(lapic + LAPIC_TPR, 0);
    mmio_write32(lapic + LAPIC_SVR, 0x100 | VEC_SPURIOUS);
    for (u32 pin = 0; pin < IOAPIC_PINS; pin++) {
        ioapic_write(0x11 + 2 * pin, 0);
        ioapic_route(pin, 0, 1);
    }
}

IRQ_PATH void lapic_eoi(void)
{
    mmio_write32(lapic + LAPIC_EOI, 0);
}

/* Is `vector` in service at the local APIC? An interrupt is, an exception is not. */
int lapic_in_service(u32 vector)
{
    return mmio_read32(lapic + LAPIC_ISR + 16 * (vector / 32)) >> (vector % 32) & 1;
}

/* Channel c's vector v: its counter in shared memory, its IDT vector, its host doorbell. */
static struct proxy_irq *slot(int c, u32 v) { return proxy_irq_slot(c, v); }
static u32 idt_vector(int c, u32 v) { return VEC_MSI_BASE + (u32)c * PROXY_IRQ_VECTORS + v; }

static void record(struct proxy_irq *r, u64 tsc)
{
    r->tsc = tsc;
    barrier();
    r->count++;
}

/* One dispatch for every device interrupt. */
IRQ_PATH void irq(struct trapframe *tf)
{
    u64 tsc = rdtsc();                  /* first: this is "handler entry" */
    u32 v = (u32)tf->vector;
    u64 woken[2] = { 0, 0 };            /* channel vectors (c * PROXY_IRQ_VECTORS + v) whose waiter to wake */
    int eoi = 1;                        /* every vector but the spurious ones: after the wake-ups */
    if (v == VEC_KICK) {
        kicks++;
    } else if (v == VEC_DMAR) {
        iommu_fault(tsc);
    } else if (v >= VEC_GSI_BASE && v < VEC_GSI_BASE + IOAPIC_PINS) {
        struct line *l = &lines[v - VEC_GSI_BASE];
        if (l->level)
            ioapic_route(v - VEC_GSI_BASE, 1, 1);   /* automask until every owner acks */
        if (!l->owners || (l->level && l->waiting)) {
            /*
             * Nobody's, or a level line that is masked and not yet acked: a
             * delivery that was already pending when the mask landed (seen
             * under KVM). Its owners have not handled the last one yet.
             */
            shared->spurious_irqs++;
        } else {
            l->waiting = l->level ? l->owners : 0;
            for (u32 owners = l->owners; owners; owners &= owners - 1) {  /* by bit: a line has one or two */
                int c = __builtin_ctz(owners);
                struct proxy_irq *r = slot(c, 0);      /* one call: slot() is proxy.c's */
                r->masked = (u32)l->level;
                record(r, tsc);
                woken[c * PROXY_IRQ_VECTORS / 64] |= 1ull << (c * PROXY_IRQ_VECTORS % 64);
            }
        }
    } else if (v >= VEC_MSI_BASE && v < VEC_MSI_BASE + PROXY_TOTAL_CHANNELS * PROXY_IRQ_VECTORS
               && (channel_mode[(v - VEC_MSI_BASE) / PROXY_IRQ_VECTORS] == PROXY_IRQ_MSI
                   || channel_mode[(v - VEC_MSI_BASE) / PROXY_IRQ_VECTORS] == PROXY_IRQ_MSIX)
               && (v - VEC_MSI_BASE) % PROXY_IRQ_VECTORS < channel_vectors[(v - VEC_MSI_BASE) / PROXY_IRQ_VECTORS]) {
        u32 n = v - VEC_MSI_BASE;
        record(slot((int)(n / PROXY_IRQ_VECTORS), n % PROXY_IRQ_VECTORS), tsc);
        woken[n / 64] |= 1ull << (n % 64);
    } else if (v == VEC_SPURIOUS || v == VEC_PIC_BASE + 7) {
        shared->spurious_irqs++;        /* LAPIC or 8259 spurious: no EOI */
        eoi = 0;
    } else if (v == VEC_PIC_BASE + 15) {
        shared->spurious_irqs++;
        outb(0x20, 0x20);               /* the slave's spurious IRQ still needs the master's EOI */
        eoi = 0;
    } else {
        shared->spurious_irqs++;        /* nobody asked for this vector */
    }
    /* By set bit, not by vector: a test of all 96 channel vectors on every interrupt
     * stood between the handler's entry and the host's wake-up. */
    for (u32 i = 0; i < ARRAY_SIZE(woken); i++)
        for (u64 bits = woken[i]; bits; bits &= bits - 1) {
            u32 n = 64 * i + (u32)__builtin_ctzll(bits);
            proxy_wake_irq((int)(n / PROXY_IRQ_VECTORS), n % PROXY_IRQ_VECTORS);
        }
    /* The EOI after the wake-ups: the host is woken one emulated LAPIC write sooner, and
     * interrupts stay off in the handler, so nothing nests in between. */
    if (eoi)
        lapic_eoi();
}

/* Channel c takes `n` vectors of `mode`: each reports its mode and IDT vector (or `line`). */
static void claim(int c, int mode, u32 n, u32 line)
{
    channel_mode[c] = mode;
    channel_vectors[c] = n;
    for (u32 v = 0; v < PROXY_IRQ_VECTORS; v++) {
        slot(c, v)->mode = v < n ? (u32)mode : PROXY_IRQ_NONE;
        slot(c, v)->line = v < n ? (mode == PROXY_IRQ_MSI || mode == PROXY_IRQ_MSIX ? idt_vector(c, v) : line) : 0;
        slot(c, v)->masked = 0;
    }
}

/* Attach channel c to every IOAPIC input in `pins`; `line` is what the host is told. */
static u16 attach_lines(int c, u32 pins, int level, int mode, u32 line)
{
    for (u32 pin = 0; pin < IOAPIC_PINS; pin++)
        if ((pins & (1u << pin)) && lines[pin].owners && lines[pin].level != level)
            return PROXY_STATUS_DENIED; /* an edge ISA line is not shared with a level PCI one */
    irq_off();
    for (u32 pin = 0; pin < IOAPIC_PINS; pin++) {
        if (!(pins & (1u << pin)))
            continue;
        struct line *l = &lines[pin];
        int first = !l->owners;
        l->owners |= 1u << c;
        l->level = level;
        if (first)
            ioapic_route(pin, level, 0);
    }
    claim(c, mode, 1, line);
    channel_pins[c] = pins;
    irq_on();
    return PROXY_STATUS_OK;
}

/* The command register's INTx Disable bit: set while MSI is in use, clear for INTx. */
static void set_intx_disable(const struct proxy_pci_device *d, int disable)
{
    u16 cmd = pci_cfg_read(d->bus, d->dev, d->fn, PROXY_PCI_COMMAND, 2);
    cmd = disable ? cmd | PROXY_PCI_COMMAND_INTX_DISABLE : cmd & ~PROXY_PCI_COMMAND_INTX_DISABLE;
    pci_cfg_write(d->bus, d->dev, d->fn, PROXY_PCI_COMMAND, 2, cmd);
}

u16 irq_enable_intx(int c, const struct proxy_pci_device *d)
{
    if (channel_mode[c] != PROXY_IRQ_NONE)
        return PROXY_STATUS_BAD_REQUEST;
    if (!d || d->gsi >= IOAPIC_PINS)
        return PROXY_STATUS_FAULT;
    set_intx_disable(d, 0);
    return attach_lines(c, 1u << d->gsi, 1, PROXY_IRQ_INTX, d->gsi);
}

/*
 * ISA IRQs, a bitmask (the i8042 needs 1 and 12 on one channel). ISA IRQ n
 * is IOAPIC input n here; 0 and 2 are the timer's, 4 the proxy's console.
 */
u16 irq_enable_isa(int c, u64 isa_irqs)
{
    if (channel_mode[c] != PROXY_IRQ_NONE || isa_irqs == 0 || isa_irqs > 0xffff)
        return PROXY_STATUS_BAD_REQUEST;
    if (isa_irqs & ((1u << 0) | (1u << 2) | (1u << 4)))
        return PROXY_STATUS_DENIED;
    return attach_lines(c, (u32)isa_irqs, 0, PROXY_IRQ_ISA, (u32)isa_irqs);
}

static int find_cap(const struct proxy_pci_device *d, u8 id)
{
    for (int i = 0; i < d->ncaps; i++)
        if (d->caps[i].id == id)
            return d->caps[i].offset;
    return 0;
}

/*
 * The proxy writes the MSI address and data itself: a driver may not aim a DMA
 * write anywhere. Multiple messages (PCI 3.0 6.8.1.3): `vectors`, a power of
 * two the device offers (MMC), at most PROXY_IRQ_VECTORS; the device puts
 * message v into the data's low bits, and a channel's block of IDT vectors is
 * aligned to PROXY_IRQ_VECTORS, so message v lands on the channel's vector v.
 */
_Static_assert(VEC_MSI_BASE + PROXY_TOTAL_CHANNELS * PROXY_IRQ_VECTORS <= VEC_SPURIOUS,
               "every channel's vectors fit below the spurious vector");
_Static_assert((VEC_MSI_BASE % PROXY_IRQ_VECTORS) == 0 && (PROXY_IRQ_VECTORS & (PROXY_IRQ_VECTORS - 1)) == 0,
               "multiple-message MSI needs each channel's vectors aligned to their count");

u16 irq_enable_msi(int c, const struct proxy_pci_device *d, u64 vectors)
{
    u32 n = vectors ? (u32)vectors : 1, log2n = 0;
    if (channel_mode[c] != PROXY_IRQ_NONE || vectors > PROXY_IRQ_VECTORS || (n & (n - 1)))
        return PROXY_STATUS_BAD_REQUEST;
    while ((1u << log2n) < n)
        log2n++;
    int cap = d ? find_cap(d, PROXY_PCI_CAP_ID_MSI) : 0;
    if (!cap)
        return PROXY_STATUS_FAULT;
    u16 ctrl = pci_cfg_read(d->bus, d->dev, d->fn, cap + 2, 2);
    if (log2n > ((ctrl >> 1) & 7u))
        return PROXY_STATUS_FAULT;                  /* the device offers fewer messages */
    int is64 = ctrl & 0x80;
    irq_off();
    claim(c, PROXY_IRQ_MSI, n, 0);
    pci_cfg_write(d->bus, d->dev, d->fn, cap + 4, 4, 0xfee00000u);      /* APIC 0, physical */
    if (is64)
        pci_cfg_write(d->bus, d->dev, d->fn, cap + 8, 4, 0);
    pci_cfg_write(d->bus, d->dev, d->fn, cap + (is64 ? 12 : 8), 2, idt_vector(c, 0));
    pci_cfg_write(d->bus, d->dev, d->fn, cap + 2, 2, (ctrl & ~0x70) | log2n << 4 | 1);   /* MME, on */
    set_intx_disable(d, 1);
    u16 cmd = pci_cfg_read(d->bus, d->dev, d->fn, PROXY_PCI_COMMAND, 2);
    pci_cfg_write(d->bus, d->dev, d->fn, PROXY_PCI_COMMAND, 2, cmd | PROXY_PCI_COMMAND_MASTER);   /* an MSI is a DMA write */
    irq_on();
    return PROXY_STATUS_OK;
}

/*
 * MSI-X: the proxy writes table entries 0..n-1, entry v to the channel's
 * vector v (the driver may not write the table at all). A device with
 * fewer entries than asked for gets FAULT and keeps MSI-X off.
 */
u16 irq_enable_msix(int c, const struct proxy_pci_device *d, u64 vectors)
{
    u32 n = vectors ? (u32)vectors : 1;
    if (channel_mode[c] != PROXY_IRQ_NONE || vectors > PROXY_IRQ_VECTORS)
        return PROXY_STATUS_BAD_REQUEST;
    if (!d || pci_msix_entries(d) < n)
        return PROXY_STATUS_FAULT;
    irq_off();
    for (u32 v = 0; v < n; v++)
        pci_enable_msix(d, v, idt_vector(c, v));
    set_intx_disable(d, 1);
    claim(c, PROXY_IRQ_MSIX, n, 0);
    irq_on();
    return PROXY_STATUS_OK;
}

static void unmask_if_acked(u32 pin)
{
    struct line *l = &lines[pin];
    if (l->level && !l->waiting && l->owners)
        ioapic_route(pin, 1, 0);        /* still asserted? then it fires again at once */
}

u16 irq_ack(int c)
{
    if (channel_mode[c] == PROXY_IRQ_NONE)
        return PROXY_STATUS_BAD_REQUEST;
    if (channel_mode[c] == PROXY_IRQ_MSI || channel_mode[c] == PROXY_IRQ_MSIX)
        return PROXY_STATUS_OK;
    irq_off();
    for (u32 pin = 0; pin < IOAPIC_PINS; pin++) {
        if (channel_pins[c] & (1u << pin)) {
            lines[pin].waiting &= ~(1u << c);
            unmask_if_acked(pin);
        }
    }
    slot(c, 0)->masked = 0;
    irq_on();
    return PROXY_STATUS_OK;
}

/* Detach channel c from its interrupt; a closing channel never leaves a line masked for others. */
void irq_disable(int c, const struct proxy_pci_device *d)
{
    irq_off();
    int mode = channel_mode[c];
    for (u32 pin = 0; pin < IOAPIC_PINS; pin++) {
        if (!(channel_pins[c] & (1u << pin)))
            continue;
        struct line *l = &lines[pin];
        l->owners &= ~(1u << c);
        l->waiting &= ~(1u << c);
        if (!l->owners)
            ioapic_route(pin, l->level, 1);
        else
            unmask_if_acked(pin);
    }
    channel_pins[c] = 0;
    if (mode == PROXY_IRQ_MSI && d) {
        int cap = find_cap(d, PROXY_PCI_CAP_ID_MSI);
        u16 ctrl = pci_cfg_read(d->bus, d->dev, d->fn, cap + 2, 2);
        pci_cfg_write(d->bus, d->dev, d->fn, cap + 2, 2, ctrl & ~1);
        set_intx_disable(d, 0);
    } else if (mode == PROXY_IRQ_MSIX && d) {
        pci_disable_msix(d);
        set_intx_disable(d, 0);
    }
    claim(c, PROXY_IRQ_NONE, 0, 0);
    irq_on();
}
