/* vectors.h - IDT vectors, shared by boot.S and C. Must match PROXY_VECTOR_KICK in abi.h. */
#ifndef VECTORS_H
#define VECTORS_H
#define VEC_PIC_BASE_0 32       /* legacy 8259s remapped to 32..47, all masked */
#define VEC_PIC_BASE_7 39       /* master's spurious IRQ7 */
#define VEC_PIC_BASE_15 47      /* slave's spurious IRQ15 */
#define VEC_KICK 64             /* ivshmem MSI-X vector 0: the host's kick */
#define VEC_UNEXPECTED 254      /* every other vector lands here and is counted */
#define VEC_SPURIOUS 255        /* LAPIC spurious vector */
#endif
