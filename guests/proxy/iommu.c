/*
 * iommu.c - DMA domains on the emulated Intel VT-d (VT-d spec 3.x, legacy mode).
 *
 * Each open PCI channel lends its device one domain: a slice of the DMA pool.
 * The device gets a context entry (domain id = the channel) and a 3-level
 * second-level page table that maps exactly that slice, read/write, IOVA =
 * guest-physical, so drivers program the same addresses with the IOMMU on or
 * off. Nothing else is mapped for anybody: not the proxy's code, data or page
 * tables, not the control page, not the rings. A device with no open channel
 * has no context entry, so all of its DMA faults.
 *
 * Devices of one driver may share a domain (PROXY_OP_OPEN_PCI_SHARED, as a VFIO
 * container does), so a bridge sends a received buffer without a copy. Each
 * sharer still gets tables and a domain id of its own channel, mapping the same
 * pages: closing one tears down nothing the others use, and no table outlives
 * its channel.
 *
 * Faults: the IOMMU records each failed translation in a fault recording
 * register and raises the fault event interrupt; the handler reads and clears
 * the records and posts each to the channel that owns the device.
 *
 * Register-based invalidation only (no queued invalidation): every change is
 * followed by a global context-cache and IOTLB invalidation. Registers are
 * accessed 32 bits wide: QEMU 7.2 asserts on wider accesses to some of them.
 */
#include "kernel.h"
#include "vectors.h"

#define DMAR_BASE 0xfed90000ull         /* where QEMU's intel-iommu sits on q35 */
#define DMAR_VER 0x00
#define DMAR_CAP 0x08
#define DMAR_ECAP 0x10
#define DMAR_GCMD 0x18
#define DMAR_GSTS 0x1c
#define DMAR_RTADDR 0x20
#define DMAR_CCMD 0x28
#define DMAR_FSTS 0x34
#define DMAR_FECTL 0x38
#define DMAR_FEDATA 0x3c
#define DMAR_FEADDR 0x40
#define DMAR_FEUADDR 0x44

#define GCMD_TE (1u << 31)              /* translation enable */
#define GCMD_SRTP (1u << 30)            /* set root table pointer */
#define GSTS_KEEP (GCMD_TE | (1u << 26) | (1u << 25) | (1u << 23))  /* TE, QIE, IRE, CFI: restate them */
#define CCMD_ICC (1u << 31)             /* in the high dword */
#define CCMD_GLOBAL (1u << 29)          /* CIRG = 01 */
#define IOTLB_IVT (1u << 31)            /* in the high dword */
#define IOTLB_GLOBAL (1u << 28)         /* IIRG = 01 */
#define FSTS_CLEAR 0x7du                /* PFO, AFO, APF, IQE, ICE, ITE: write 1 to clear */
#define FSTS_PPF (1u << 1)
#define FECTL_IM (1u << 31)
#define FRCD_F (1u << 31)               /* of the record's highest dword */
#define FRCD_T (1u << 30)               /* 1: the request was a read */

#define PTE_R 1ull
#define PTE_W 2ull
#define CONTEXT_BUSES 4                 /* PCI buses with devices a channel may hold */
#define L1_TABLES (PROXY_DOMAIN_MAX / 0x200000 + 1)

#define PAGE __attribute__((aligned(4096)))

static u64 root[512] PAGE;                              /* 256 root entries of 16 bytes */
static u64 contexts[CONTEXT_BUSES][512] PAGE;           /* 256 context entries of 16 bytes, per bus */
static int context_bus[CONTEXT_BUSES];                  /* which bus each context table serves; -1 none */
static struct {
    u64 l3[512] PAGE;
    u64 l2[512] PAGE;
    u64 l1[L1_TABLES][512] PAGE;
} tables[PROXY_TOTAL_CHANNELS];
static u32 fault_records, fault_base;                   /* how many, and where (CAP.NFR, CAP.FRO) */
static u32 iotlb;                                       /* the IOTLB invalidate register (ECAP.IRO) */
static int on;

static u32 r32(u32 reg) { return mmio_read32(DMAR_BASE + reg); }
static void w32(u32 reg, u32 v) { mmio_write32(DMAR_BASE + reg, v); }

static u64 phys(const void *p) { return (u64)(unsigned long)p; }     /* the kernel is identity-mapped */

/* Wait until register `reg`'s `bit` is `set` (1) or clear (0); the IOMMU answers at once, so a long wait is a bug. */
static void wait_bit(u32 reg, u32 bit, int set, const char *what)
{
    for (u32 spins = 0; !(r32(reg) & bit) != !set; spins++)
        if (spins > 10000000)
            panic(what);
}

/* Set one GCMD bit, restating those already on (QEMU toggles any that differ), and wait for it. */
static void command(u32 bit)
{
    w32(DMAR_GCMD, (r32(DMAR_GSTS) & GSTS_KEEP) | bit);
    wait_bit(DMAR_GSTS, bit, 1, "iommu: a global command did not complete");
}

/* Global context-cache, then IOTLB, invalidation (VT-d 6.5.1, register-based). */
static void invalidate(void)
{
    w32(DMAR_CCMD, 0);
    w32(DMAR_CCMD + 4, CCMD_ICC | CCMD_GLOBAL);
    wait_bit(DMAR_CCMD + 4, CCMD_ICC, 0, "iommu: a context-cache invalidation did not complete");
    w32(iotlb, 0);
    w32(iotlb + 4, IOTLB_IVT | IOTLB_GLOBAL);
    wait_bit(iotlb + 4, IOTLB_IVT, 0, "iommu: an IOTLB invalidation did not complete");
}

int iommu_present(void)
{
    return on;
}

/* Find the IOMMU; if there is one, turn translation on with nothing mapped. */
void iommu_init(void)
{
    u32 ver = r32(DMAR_VER), cap_lo = r32(DMAR_CAP), cap_hi = r32(DMAR_CAP + 4);
    if (ver == 0 || ver == 0xffffffff || (ver >> 4 & 0xf) == 0 || cap_lo == 0xffffffff)
        return;                             /* no VT-d on this machine: DMA is not confined */
    if (!(cap_lo >> 8 & 2))
        panic("iommu: no 39-bit, 3-level second-level tables (CAP.SAGAW)");
    u64 cap = (u64)cap_hi << 32 | cap_lo;
    fault_records = (u32)(cap >> 40 & 0xff) + 1;
    fault_base = (u32)(cap >> 24 & 0x3ff) * 16;
    iotlb = (r32(DMAR_ECAP) >> 8 & 0x3ff) * 16 + 8;
    for (int i = 0; i < CONTEXT_BUSES; i++)
        context_bus[i] = -1;
    w32(DMAR_FEDATA, VEC_DMAR);
    w32(DMAR_FEADDR, 0xfee00000u);          /* the boot CPU's LAPIC */
    w32(DMAR_FEUADDR, 0);
    w32(DMAR_FECTL, 0);                     /* unmask the fault event */
    w32(DMAR_RTADDR, (u32)phys(root));
    w32(DMAR_RTADDR + 4, (u32)(phys(root) >> 32));
    command(GCMD_SRTP);
    invalidate();
    command(GCMD_TE);
    on = 1;
    kprintf("proxy: iommu on, %u fault records at %x\n", fault_records, fault_base);
}

static u64 *context_table(u8 bus)
{
    for (int i = 0; i < CONTEXT_BUSES; i++)
        if (context_bus[i] == bus)
            return contexts[i];
    for (int i = 0; i < CONTEXT_BUSES; i++) {
        if (context_bus[i] < 0) {
            context_bus[i] = bus;
            root[2 * bus + 1] = 0;
            root[2 * bus] = phys(contexts[i]) | 1;      /* present */
            return contexts[i];
        }
    }
    return NULL;
}

/* Map channel c's domain [base, base + size) for device bus:devfn, and nothing else (tables[c]). */
u16 iommu_map(int c, u8 bus, u8 devfn, u64 base, u64 size)
{
    if (!on)
        return PROXY_STATUS_OK;
    if (!size)
        return PROXY_STATUS_OK;             /* no domain: the device may not DMA at all */
    if (base >> 30 != (base + size - 1) >> 30)
        return PROXY_STATUS_BAD_REQUEST;    /* one level-3 entry per domain */
    u64 *ctx = context_table(bus);
    if (!ctx)
        return PROXY_STATUS_FAULT;
    memset(&tables[c], 0, sizeof(tables[c]));
    tables[c].l3[base >> 30 & 511] = phys(tables[c].l2) | PTE_R | PTE_W;
    u64 first_2m = base >> 21;
    for (u64 page = base; page < base + size; page += 0x1000) {
        u64 *l1 = tables[c].l1[(page >> 21) - first_2m];
        tables[c].l2[page >> 21 & 511] = phys(l1) | PTE_R | PTE_W;
        l1[page >> 12 & 511] = page | PTE_R | PTE_W;
    }
    ctx[2 * devfn + 1] = 1 | (u64)c << 8;   /* AW = 39-bit 3-level; domain id = the channel */
    barrier();
    ctx[2 * devfn] = phys(tables[c].l3) | 1;    /* present; T = 00: translated requests only */
    invalidate();
    return PROXY_STATUS_OK;
}

/* Forget device bus:devfn's context: from now on all its DMA faults. */
void iommu_unmap(u8 bus, u8 devfn)
{
    if (!on)
        return;
    u64 *ctx = context_table(bus);
    if (!ctx)
        return;
    ctx[2 * devfn] = 0;
    ctx[2 * devfn + 1] = 0;
    invalidate();
}

/* The fault event interrupt: read and clear every record, post each to its channel. */
void iommu_fault(u64 tsc)
{
    if (!on)
        return;
    while (r32(DMAR_FSTS) & FSTS_PPF) {
        for (u32 i = 0; i < fault_records; i++) {
            u32 reg = fault_base + 16 * i;
            u32 hi = r32(reg + 12);
            if (!(hi & FRCD_F))
                continue;
            u64 addr = (u64)r32(reg + 4) << 32 | (r32(reg) & ~0xfffu);
            u32 source = r32(reg + 8) & 0xffff;
            u8 reason = (u8)hi;
            w32(reg + 12, FRCD_F);                   /* clear this record */
            proxy_dma_fault(source, addr, !(hi & FRCD_T), reason, tsc);
        }
        w32(DMAR_FSTS, FSTS_CLEAR);
    }
    w32(DMAR_FSTS, FSTS_CLEAR);
}
