// The vector operations whose AVX2 and AVX-512 intrinsics differ only in their prefix
// (_mm256_ / _mm512_) and integer-type suffix (si256 / si512): one list for both widths.
// Included inside the body of VecAVX2 / VecAVX512, after F and I are declared, with
// TQ_MM (the prefix) and TQ_SI (the suffix) defined; both are undefined at the end.
#define TQ_VCAT_(a, b) a##b
#define TQ_VCAT(a, b) TQ_VCAT_(a, b)
#define TQ_V(op) TQ_VCAT(TQ_MM, op)
#define TQ_VI(op) TQ_VCAT(TQ_MM, TQ_VCAT(op, TQ_SI))

static inline F zero() { return TQ_V(setzero_ps)(); }
static inline F set1(float a) { return TQ_V(set1_ps)(a); }
static inline F load(const float* p) { return TQ_V(loadu_ps)(p); }
static inline void store(float* p, F a) { TQ_V(storeu_ps)(p, a); }
static inline F fma(F a, F b, F c) { return TQ_V(fmadd_ps)(a, b, c); }
static inline F add(F a, F b) { return TQ_V(add_ps)(a, b); }
static inline F sub(F a, F b) { return TQ_V(sub_ps)(a, b); }
static inline F mul(F a, F b) { return TQ_V(mul_ps)(a, b); }
static inline F div(F a, F b) { return TQ_V(div_ps)(a, b); }
static inline F min(F a, F b) { return TQ_V(min_ps)(a, b); }
static inline F max(F a, F b) { return TQ_V(max_ps)(a, b); }
static inline F cvt(I a) { return TQ_V(cvtepi32_ps)(a); }
static inline I cvt_f2i(F a) { return TQ_V(cvtps_epi32)(a); }  // inputs already integral

static inline I izero() { return TQ_VI(setzero_)(); }
static inline I set1i(int32_t a) { return TQ_V(set1_epi32)(a); }
static inline I loadi(const void* p) { return TQ_VI(loadu_)((const I*)p); }
static inline void storei(void* p, I a) { TQ_VI(storeu_)((I*)p, a); }
static inline I andi(I a, I b) { return TQ_VI(and_)(a, b); }
static inline I ori(I a, I b) { return TQ_VI(or_)(a, b); }
static inline I addi(I a, I b) { return TQ_V(add_epi32)(a, b); }
static inline I subi(I a, I b) { return TQ_V(sub_epi32)(a, b); }
template <int S> static inline I srli(I a) { return TQ_V(srli_epi32)(a, S); }
template <int S> static inline I slli(I a) { return TQ_V(slli_epi32)(a, S); }
static inline I bits(F a) { return TQ_VI(castps_)(a); }
static inline F fbits(I a) { return TQ_VCAT(TQ_VCAT(TQ_MM, cast), TQ_VCAT(TQ_SI, _ps))(a); }

#undef TQ_VI
#undef TQ_V
#undef TQ_VCAT
#undef TQ_VCAT_
#undef TQ_MM
#undef TQ_SI
