/* vectors.h - IDT vectors, shared by boot.S and C. */
#ifndef VECTORS_H
#define VECTORS_H
#define VEC_PIC_BASE 32         /* legacy 8259s remapped to 32..47, all masked */
#define VEC_KICK 64             /* ivshmem MSI-X vector 0: the host's kick */
#define VEC_DMAR 65             /* the IOMMU's fault event */
#define VEC_GSI_BASE 80         /* IOAPIC input n raises vector 80 + n */
#define VEC_MSI_BASE 128        /* channel c's MSI or MSI-X entry v raises 128 + c * PROXY_IRQ_VECTORS + v */
#define VEC_SPURIOUS 255        /* LAPIC spurious vector */
#define IRQ_STUB_SIZE 16        /* boot.S: one stub per vector from 32 up, this far apart */
#endif
