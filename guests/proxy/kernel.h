/* kernel.h - what the proxy's source files share. */
#ifndef KERNEL_H
#define KERNEL_H

#include "abi.h"
#include "x86.h"

#define NULL ((void *)0)
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* The request loop's code, and the interrupt path's, each in one page of its own (link.ld):
 * TCG chains a jump straight to the next translated block only within the page that block
 * starts on; every other jump, and every call and return, looks its target up. */
#define HOT_PATH __attribute__((section(".text.hot")))
#define IRQ_PATH __attribute__((section(".text.irq")))

/* A range of addresses: a BAR, a port range, a DMA domain. */
struct window {
    u64 base, size;
};

/* Does [addr, addr + len) lie inside w? */
static inline int in_window(const struct window *w, u64 addr, u64 len)
{
    return addr >= w->base && len <= w->size && addr - w->base <= w->size - len;
}

/* kernel.c */
void kprintf(const char *fmt, ...);
void panic(const char *msg) __attribute__((noreturn));
void *memset(void *d, int c, unsigned n);
void *memcpy(void *d, const void *s, unsigned n);
u64 map_alias(u32 index, u64 phys);
extern u64 tsc_hz;

/* trap.c */
struct trapframe {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;  /* boot.S */
    u64 vector, error_code;
    u64 rip, cs, rflags, rsp, ss;                   /* pushed by the CPU */
};
void trap_init(void);
void crash(const struct trapframe *tf, const char *msg) __attribute__((noreturn));
void crash_on_purpose(u32 kind);

/* irq.c */
void irq_init(void);
void lapic_eoi(void);
int lapic_in_service(u32 vector);
u16 irq_enable_intx(int c, const struct proxy_pci_device *d);
u16 irq_enable_msi(int c, const struct proxy_pci_device *d, u64 vectors);
u16 irq_enable_msix(int c, const struct proxy_pci_device *d, u64 vectors);
u16 irq_enable_isa(int c, u64 isa_irq);
u16 irq_ack(int c);
void irq_disable(int c, const struct proxy_pci_device *d);
extern volatile u32 kicks;

/* pci.c */
u32 pci_cfg_read(u8 bus, u8 dev, u8 fn, u8 off, u8 width);
void pci_cfg_write(u8 bus, u8 dev, u8 fn, u8 off, u8 width, u32 v);
int pci_enumerate(struct proxy_pci_device *table, int max);
int pci_enable_msix(const struct proxy_pci_device *d, u32 entry, u32 vector);
void pci_disable_msix(const struct proxy_pci_device *d);
u32 pci_msix_entries(const struct proxy_pci_device *d);
u64 pci_msix_table(const struct proxy_pci_device *d);

/* iommu.c */
void iommu_init(void);
int iommu_present(void);
u16 iommu_map(int c, u8 bus, u8 devfn, u64 base, u64 size);
void iommu_unmap(u8 bus, u8 devfn);
void iommu_fault(u64 tsc);

/* native.c: each returns a request status; `dma` is the channel's DMA domain */
u16 native_tx(struct proxy_nic_loop *p, const struct window *dma, u64 bar0, volatile u32 *progress);
u16 native_rx(struct proxy_nic_loop *p, const struct window *dma, u64 bar0, volatile u32 *progress);
u16 native_disk_read(struct proxy_disk_loop *p, const struct window *dma, u64 bar, volatile u32 *progress);
u16 native_forward(struct proxy_nic_forward *p, const struct window *dma, const u64 bar0[2],
                   volatile u32 *progress);
u16 native_nvme(struct proxy_nvme_loop *p, const struct window *dma, u64 bar, volatile u32 *progress);

/* proxy.c */
extern struct proxy_shared *shared;
void proxy_dma_fault(u32 source_id, u64 addr, int write, u8 reason, u64 tsc);
void proxy_init(const struct proxy_pci_device *table, int n);
void proxy_loop(void) __attribute__((noreturn));
struct proxy_irq *proxy_irq_slot(int c, u32 v);
void proxy_wake_irq(int c, u32 v);
void proxy_crashed(void);

#endif
