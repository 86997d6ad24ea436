/* pci.c - configuration space through ports 0xcf8/0xcfc, enumeration, BAR sizing and assignment, MSI-X. */
#include "kernel.h"

static void cfg_select(u8 bus, u8 dev, u8 fn, u8 off)
{
    outl(0xcf8, 0x80000000u | (u32)bus << 16 | (u32)dev << 11 | (u32)fn << 8 | (off & 0xfc));
}

u32 pci_cfg_read(u8 bus, u8 dev, u8 fn, u8 off, u8 width)
{
    cfg_select(bus, dev, fn, off);
    switch (width) {
    case 1: return inb(0xcfc + (off & 3));
    case 2: return inw(0xcfc + (off & 2));
    default: return inl(0xcfc);
    }
}

void pci_cfg_write(u8 bus, u8 dev, u8 fn, u8 off, u8 width, u32 v)
{
    cfg_select(bus, dev, fn, off);
    switch (width) {
    case 1: outb(0xcfc + (off & 3), (u8)v); break;
    case 2: outw(0xcfc + (off & 2), (u16)v); break;
    default: outl(0xcfc, v);
    }
}

/* Size one BAR the classic way: write all ones with decoding off, read the mask back. */
static int size_bar(struct proxy_pci_device *d, int i)
{
    u8 off = PROXY_PCI_BAR0 + 4 * i;
    u32 orig = pci_cfg_read(d->bus, d->dev, d->fn, off, 4);
    struct proxy_bar *b = &d->bars[i];
    pci_cfg_write(d->bus, d->dev, d->fn, off, 4, 0xffffffff);
    u32 mask = pci_cfg_read(d->bus, d->dev, d->fn, off, 4);
    pci_cfg_write(d->bus, d->dev, d->fn, off, 4, orig);
    if (mask == 0)
        return 1;
    if (orig & 1) {
        b->is_io = 1;
        b->base = orig & ~3u;
        b->size = (u16)~(mask & ~3u) + 1;
        return 1;
    }
    b->prefetchable = (orig >> 3) & 1;
    b->base = orig & ~0xfu;
    u64 size_mask = 0xffffffff00000000ull | (mask & ~0xfu);
    if (((orig >> 1) & 3) == 2 && i < PROXY_MAX_BARS - 1) {
        b->is_64 = 1;
        u32 orig_hi = pci_cfg_read(d->bus, d->dev, d->fn, off + 4, 4);
        pci_cfg_write(d->bus, d->dev, d->fn, off + 4, 4, 0xffffffff);
        u32 mask_hi = pci_cfg_read(d->bus, d->dev, d->fn, off + 4, 4);
        pci_cfg_write(d->bus, d->dev, d->fn, off + 4, 4, orig_hi);
        b->base |= (u64)orig_hi << 32;
        size_mask = (u64)mask_hi << 32 | (mask & ~0xfu);
    }
    b->size = ~size_mask + 1;
    return b->is_64 ? 2 : 1;
}

static void read_caps(struct proxy_pci_device *d)
{
    if (!(pci_cfg_read(d->bus, d->dev, d->fn, PROXY_PCI_STATUS, 2) & PROXY_PCI_STATUS_CAP_LIST))
        return;
    u8 ptr = pci_cfg_read(d->bus, d->dev, d->fn, PROXY_PCI_CAP_PTR, 1) & 0xfc;
    for (int guard = 0; ptr && guard < 48 && d->ncaps < PROXY_MAX_CAPS; guard++) {
        d->caps[d->ncaps].id = pci_cfg_read(d->bus, d->dev, d->fn, ptr, 1);
        d->caps[d->ncaps].offset = ptr;
        d->ncaps++;
        ptr = pci_cfg_read(d->bus, d->dev, d->fn, ptr + 1, 1) & 0xfc;
    }
}

/*
 * Where INTx lands on the IOAPIC. QEMU's ICH9 (hw/isa/lpc_ich9.c,
 * ich9_cc_init) wires INT[A-D] of bus-0 slots 0..24 to PIRQ[E-H] as
 * (slot + pin) % 4 + 4, and PIRQ n drives IOAPIC input 16 + n. Slots 25..31
 * follow chipset registers and bridges swizzle: those are not known here.
 */
static u8 q35_gsi(u8 bus, u8 dev, u8 pin)
{
    if (bus != 0 || dev >= 25 || pin < 1 || pin > 4)
        return PROXY_NO_GSI;
    return (u8)(16 + (dev + pin - 1) % 4 + 4);
}

static int scan_bus(u8 bus, struct proxy_pci_device *table, int n, int max)
{
    for (u8 dev = 0; dev < 32; dev++) {
        for (u8 fn = 0; fn < 8; fn++) {
            u32 id = pci_cfg_read(bus, dev, fn, 0, 4);
            if ((id & 0xffff) == 0xffff) {
                if (fn == 0)
                    break;
                continue;
            }
            if (n == max)
                panic("scan_bus: more PCI functions than PROXY_MAX_DEVICES");
            struct proxy_pci_device *d = &table[n++];
            memset(d, 0, sizeof(*d));
            d->bus = bus; d->dev = dev; d->fn = fn;
            d->vendor = id & 0xffff;
            d->device = id >> 16;
            u32 class = pci_cfg_read(bus, dev, fn, PROXY_PCI_CLASS_REVISION, 4);
            d->revision = class & 0xff;
            d->prog_if = (class >> 8) & 0xff;
            d->subclass = (class >> 16) & 0xff;
            d->class_code = class >> 24;
            d->header_type = pci_cfg_read(bus, dev, fn, PROXY_PCI_HEADER_TYPE, 1);
            d->irq_line = pci_cfg_read(bus, dev, fn, PROXY_PCI_INTERRUPT_LINE, 1);
            d->irq_pin = pci_cfg_read(bus, dev, fn, PROXY_PCI_INTERRUPT_PIN, 1);
            d->gsi = q35_gsi(bus, dev, d->irq_pin);
            u8 layout = d->header_type & PROXY_PCI_HEADER_LAYOUT;
            int nbars = layout == PROXY_PCI_HEADER_NORMAL ? 6 : layout == PROXY_PCI_HEADER_BRIDGE ? 2 : 0;
            u16 cmd = pci_cfg_read(bus, dev, fn, PROXY_PCI_COMMAND, 2);
            pci_cfg_write(bus, dev, fn, PROXY_PCI_COMMAND, 2, cmd & ~(PROXY_PCI_COMMAND_IO | PROXY_PCI_COMMAND_MEMORY));
            for (int i = 0; i < nbars;)
                i += size_bar(d, i);
            pci_cfg_write(bus, dev, fn, PROXY_PCI_COMMAND, 2, cmd);
            read_caps(d);
            if (layout == PROXY_PCI_HEADER_BRIDGE) {
                u8 secondary = pci_cfg_read(bus, dev, fn, PROXY_PCI_SECONDARY_BUS, 1);
                if (secondary > bus)
                    n = scan_bus(secondary, table, n, max);
            }
            if (fn == 0 && !(d->header_type & PROXY_PCI_HEADER_MULTI_FUNCTION))
                break;
        }
    }
    return n;
}

/*
 * Where BARs the firmware left unassigned go. SeaBIOS assigns every BAR; qboot, the
 * faster firmware, assigns none on q35 (each reads 0, decoding off), so the proxy does
 * it the way SeaBIOS would: memory BARs in q35's 32-bit hole, above MMCONFIG (QEMU puts
 * the PCIe ECAM at 0xb0000000, 256 MiB, above the low RAM of any guest under 2.75 GiB)
 * and below the IOAPIC, 64-bit ones too, as the proxy maps only the low 4 GiB; I/O BARs
 * from 0xc000. Each space starts above the BARs the firmware did assign.
 */
#define BAR_MEM_START 0xc0000000ull
#define BAR_MEM_END   0xfec00000ull
#define BAR_IO_START  0xc000ull
#define BAR_IO_END    0x10000ull

struct bar_space {
    u64 next, end;
};

/* The largest BAR with a size and no address; NULL when every BAR has one. */
static struct proxy_bar *largest_unassigned(struct proxy_pci_device *table, int n, int *dev, int *bar)
{
    struct proxy_bar *found = NULL;
    for (int i = 0; i < n; i++)
        for (int b = 0; b < PROXY_MAX_BARS; b++) {
            struct proxy_bar *x = &table[i].bars[b];
            if (x->size && !x->base && (!found || x->size > found->size)) {
                found = x;
                *dev = i;
                *bar = b;
            }
        }
    return found;
}

/* Give every unassigned BAR an address, largest first, each aligned to its size (BAR sizes
 * are powers of two), and turn on the decoding of each space a device was given. */
static void assign_bars(struct proxy_pci_device *table, int n)
{
    struct bar_space space[2] = { { BAR_MEM_START, BAR_MEM_END }, { BAR_IO_START, BAR_IO_END } };  /* [is_io] */
    u16 decode[PROXY_MAX_DEVICES] = { 0 };
    for (int i = 0; i < n; i++)
        for (int b = 0; b < PROXY_MAX_BARS; b++) {
            const struct proxy_bar *x = &table[i].bars[b];
            struct bar_space *s = &space[x->is_io];
            if (x->size && x->base && x->base < s->end && x->base + x->size > s->next)
                s->next = x->base + x->size;
        }
    int i, b;
    struct proxy_bar *x;
    while ((x = largest_unassigned(table, n, &i, &b))) {
        struct bar_space *s = &space[x->is_io];
        u64 at = (s->next + x->size - 1) & ~(x->size - 1);
        if (at + x->size > s->end)
            panic("assign_bars: no room left for a BAR below 4 GiB");
        x->base = at;
        s->next = at + x->size;
        struct proxy_pci_device *d = &table[i];
        u8 off = PROXY_PCI_BAR0 + 4 * b;
        pci_cfg_write(d->bus, d->dev, d->fn, off, 4, (u32)at);     /* the type bits are read-only */
        if (x->is_64)
            pci_cfg_write(d->bus, d->dev, d->fn, off + 4, 4, (u32)(at >> 32));
        decode[i] |= x->is_io ? PROXY_PCI_COMMAND_IO : PROXY_PCI_COMMAND_MEMORY;
    }
    for (i = 0; i < n; i++)
        if (decode[i]) {
            struct proxy_pci_device *d = &table[i];
            u16 cmd = pci_cfg_read(d->bus, d->dev, d->fn, PROXY_PCI_COMMAND, 2);
            pci_cfg_write(d->bus, d->dev, d->fn, PROXY_PCI_COMMAND, 2, cmd | decode[i]);
        }
}

int pci_enumerate(struct proxy_pci_device *table, int max)
{
    int n = scan_bus(0, table, 0, max);
    assign_bars(table, n);
    return n;
}

/* How many MSI-X table entries the device has; 0 without MSI-X. */
u32 pci_msix_entries(const struct proxy_pci_device *d)
{
    for (int i = 0; i < d->ncaps; i++)
        if (d->caps[i].id == PROXY_PCI_CAP_ID_MSIX)
            return (pci_cfg_read(d->bus, d->dev, d->fn, d->caps[i].offset + PROXY_PCI_MSIX_FLAGS, 2)
                    & PROXY_PCI_MSIX_FLAGS_QSIZE) + 1;
    return 0;
}

/* The guest-physical address of the device's MSI-X table (in one of its BARs); 0 without MSI-X. */
u64 pci_msix_table(const struct proxy_pci_device *d)
{
    for (int i = 0; i < d->ncaps; i++) {
        if (d->caps[i].id != PROXY_PCI_CAP_ID_MSIX)
            continue;
        u32 table = pci_cfg_read(d->bus, d->dev, d->fn, d->caps[i].offset + PROXY_PCI_MSIX_TABLE, 4);
        u32 bir = table & PROXY_PCI_MSIX_TABLE_BIR;
        return bir < PROXY_MAX_BARS ? d->bars[bir].base + (table & ~(u32)PROXY_PCI_MSIX_TABLE_BIR) : 0;
    }
    return 0;
}

/* Point MSI-X table entry `entry` at this CPU's LAPIC with `vector`, and turn MSI-X on. */
int pci_enable_msix(const struct proxy_pci_device *d, u32 entry, u32 vector)
{
    for (int i = 0; i < d->ncaps; i++) {
        if (d->caps[i].id != PROXY_PCI_CAP_ID_MSIX)
            continue;
        u8 cap = d->caps[i].offset;
        u64 table = pci_msix_table(d);
        if (!table)
            return -1;
        u64 slot = table + PROXY_PCI_MSIX_ENTRY_SIZE * entry;
        u16 cmd = pci_cfg_read(d->bus, d->dev, d->fn, PROXY_PCI_COMMAND, 2);
        pci_cfg_write(d->bus, d->dev, d->fn, PROXY_PCI_COMMAND, 2,
                      cmd | PROXY_PCI_COMMAND_MEMORY | PROXY_PCI_COMMAND_MASTER);
        mmio_write32(slot + 0, 0xfee00000u);    /* destination: APIC id 0, physical mode */
        mmio_write32(slot + 4, 0);
        mmio_write32(slot + 8, vector);         /* fixed delivery, edge */
        mmio_write32(slot + 12, 0);             /* unmasked */
        u16 ctrl = pci_cfg_read(d->bus, d->dev, d->fn, cap + PROXY_PCI_MSIX_FLAGS, 2);
        pci_cfg_write(d->bus, d->dev, d->fn, cap + PROXY_PCI_MSIX_FLAGS, 2, (ctrl | 0x8000) & ~0x4000);
        return 0;
    }
    return -1;
}

void pci_disable_msix(const struct proxy_pci_device *d)
{
    for (int i = 0; i < d->ncaps; i++) {
        if (d->caps[i].id == PROXY_PCI_CAP_ID_MSIX) {
            u8 cap = d->caps[i].offset;
            u16 ctrl = pci_cfg_read(d->bus, d->dev, d->fn, cap + PROXY_PCI_MSIX_FLAGS, 2);
            pci_cfg_write(d->bus, d->dev, d->fn, cap + PROXY_PCI_MSIX_FLAGS, 2, ctrl & ~0x8000);
        }
    }
}
