// LogQuant's precision overlay; see logquant-overlay.h and include/logquant.h.
#include "logquant-overlay.h"

#include "logquant.h"

#include "llama-context.h"
#include "llama-hparams.h"
#include "llama-kv-cache-iswa.h"
#include "llama-model.h"

#include "ggml-cpu.h"

#include <algorithm>
#include <map>
#include <string>

logquant_overlay::logquant_overlay(llama_kv_cache & kv, uint32_t n_slots)
    : kv(kv), n_slots(std::min(n_slots, kv.get_size())), n_cells(kv.get_size()), n_stream(kv.n_stream) {
    if (kv.other != nullptr) {
        throw std::runtime_error("this model shares KV cells between caches, which the overlay does not support");
    }
    if (kv.v_trans) {
        throw std::runtime_error("the V cache is transposed (flash attention off); the overlay needs flash attention");
    }
    // Rows per stream in the tensors: at least one, so that an overlay of 0 slots
    // (every token 2-bit, through the same kernels) still has tensors to pass.
    const uint32_t rows = std::max<uint32_t>(this->n_slots, 1);

    std::map<ggml_backend_buffer_type_t, ggml_context *> ctx_for;
    for (const auto & layer : kv.layers) {
        if (layer.k == nullptr || layer.v == nullptr || layer.k->buffer == nullptr || layer.k->data == nullptr) {
            throw std::runtime_error("the KV cache has no allocated K and V tensors (no_alloc context or MLA model)");
        }
        if (!ggml_backend_buffer_is_host(layer.k->buffer)) {
            throw std::runtime_error("the KV cache lives on an accelerator, where the two-tier kernels do not run yet (CPU only)");
        }
        ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(layer.k->buffer);
        auto it = ctx_for.find(buft);
        if (it == ctx_for.end()) {
            ggml_init_params params = {
                /*.mem_size   =*/ size_t(2u*kv.layers.size()*(1 + n_stream))*ggml_tensor_overhead(),
                /*.mem_buffer =*/ nullptr,
                /*.no_alloc   =*/ true,
            };
            ggml_context * ctx = ggml_init(params);
            if (ctx == nullptr) {
                throw std::runtime_error("failed to create a ggml context for the overlay");
            }
            ctxs.emplace_back(ctx);
            it = ctx_for.emplace(buft, ctx).first;
        }
        ggml_tensor * k = ggml_new_tensor_2d(it->second, GGML_TYPE_F16, layer.k->ne[0], int64_t(rows)*n_stream);
        ggml_tensor * v = ggml_new_tensor_2d(it->second, GGML_TYPE_F16, layer.v->ne[0], int64_t(rows)*n_stream);
        ggml_format_name(k, "logquant_overlay_k_l%d", layer.il);
        ggml_format_name(v, "logquant_overlay_v_l%d", layer.il);
        k_ov.push_back(k);
        v_ov.push_back(v);
    }
    for (auto & [buft, ctx] : ctx_for) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft);
        if (buf == nullptr) {
            throw std::runtime_error("out of memory allocating the overlay");
        }
        ggml_backend_buffer_clear(buf, 0);
        bytes += ggml_backend_buffer_get_size(buf);
        bufs.emplace_back(buf);
    }

    slot_to_cell.assign(size_t(n_stream)*this->n_slots, -1);
    cell_to_slot.assign(size_t(n_stream)*n_cells, -1);
    free_slots.resize(n_stream);
    for (auto & fs : free_slots) {
        // popped from the back: slot 0 first
        for (int32_t s = int32_t(this->n_slots) - 1; s >= 0; --s) {
            fs.push_back(s);
        }
    }
    state.n_slots      = int32_t(this->n_slots);
    state.n_cells      = int32_t(n_cells);
    state.slot_to_cell = slot_to_cell.data();
    state.cell_to_slot = cell_to_slot.data();
    layer_params.assign(kv.hparams.n_layer(), logquant_attn_layer{ &state, 1.0f, 0.0f, 0.0f });
}

void logquant_overlay::free_slot(uint32_t strm, int32_t slot) {
    int32_t & cell = slot_to_cell[size_t(strm)*n_slots + slot];
    if (cell < 0) {
        return;
    }
    cell_to_slot[size_t(strm)*n_cells + cell] = -1;
    cell = -1;
    free_slots[strm].push_back(slot);
}

void logquant_overlay::sweep() {
    for (uint32_t strm = 0; strm < n_stream; ++strm) {
        const auto & cells = kv.v_cells[strm];
        for (uint32_t slot = 0; slot < n_slots; ++slot) {
            const int32_t c = slot_to_cell[size_t(strm)*n_slots + slot];
            if (c >= 0 && cells.is_empty(c)) {
                free_slot(strm, int32_t(slot));
            }
        }
    }
}

void logquant_overlay::on_ubatch(const llama_kv_cache::slot_info & sinfo, const llama_ubatch & ubatch) {
    sweep();
    token_row.assign(ubatch.n_tokens, -1);
    for (uint32_t s = 0; s < sinfo.n_stream(); ++s) {
        const uint32_t strm = sinfo.strm[s];
        for (uint32_t ii = 0; ii < sinfo.size(); ++ii) {
            const uint32_t i    = s*sinfo.size() + ii;
            const uint32_t cell = sinfo.idxs[s][ii];
            int32_t & slot = cell_to_slot[size_t(strm)*n_cells + cell];
            if (slot < 0) {
                if (free_slots[strm].empty()) {
                    if (n_slots > 0) {
                        misses++;
                    }
                    continue;
                }
                slot = free_slots[strm].back();
                free_slots[strm].pop_back();
                slot_to_cell[size_t(strm)*n_slots + slot] = int32_t(cell);
            }
            token_row[i] = int32_t(strm*n_slots) + slot;
        }
    }
    state.s0        = int32_t(sinfo.s0);
    state.n_tokens  = int32_t(ubatch.n_tokens);
    state.token_row = token_row.data();
}

void logquant_overlay::copy_maps(uint32_t ssrc, uint32_t sdst) {
    std::copy_n(slot_to_cell.begin() + size_t(ssrc)*n_slots, n_slots, slot_to_cell.begin() + size_t(sdst)*n_slots);
    std::copy_n(cell_to_slot.begin() + size_t(ssrc)*n_cells, n_cells, cell_to_slot.begin() + size_t(sdst)*n_cells);
    free_slots[sdst] = free_slots[ssrc];
}

void logquant_overlay::copy_stream(uint32_t ssrc, uint32_t sdst) {
    for (size_t il = 0; il < k_ov.size() && n_slots > 0; ++il) {
        for (ggml_tensor * t : { k_ov[il], v_ov[il] }) {
            const size_t n = t->nb[1]*n_slots;
            std::vector<uint8_t> tmp(n);
            ggml_backend_tensor_get(t, tmp.data(), n*ssrc, n);
            ggml_backend_tensor_set(t, tmp.data(), n*sdst, n);
        }
    }
}

void logquant_overlay::drop_shifted() {
    for (uint32_t strm = 0; strm < n_stream; ++strm) {
        const auto & cells = kv.v_cells[strm];
        for (uint32_t slot = 0; slot < n_slots; ++slot) {
            const int32_t c = slot_to_cell[size_t(strm)*n_slots + slot];
            if (c >= 0 && !cells.is_empty(c) && cells.get_shift(c) != 0) {
                free_slot(strm, int32_t(slot));
            }
        }
    }
}

void logquant_overlay::forget(llama_seq_id seq) {
    sweep();
    for (uint32_t strm = 0; strm < n_stream; ++strm) {
        const auto & cells = kv.v_cells[strm];
        for (uint32_t slot = 0; slot < n_slots; ++slot) {
            const int32_t c = slot_to_cell[size_t(strm)*n_slots + slot];
            if (c >= 0 && (seq < 0 || cells.seq_has(c, seq))) {
                free_slot(strm, int32_t(slot));
            }
        }
    }
}

void logquant_overlay::set_full_precision(llama_seq_id seq, const llama_pos * pos, size_t n) {
    sweep();
    const uint32_t strm  = kv.seq_to_stream[seq];
    const auto &   cells = kv.v_cells[strm];
    for (uint32_t slot = 0; slot < n_slots; ++slot) {
        const int32_t c = slot_to_cell[size_t(strm)*n_slots + slot];
        if (c >= 0 && cells.seq_has(c, seq) && !std::binary_search(pos, pos + n, cells.pos_get(c))) {
            free_slot(strm, int32_t(slot));
        }
    }
}

std::vector<llama_pos> logquant_overlay::full_precision(llama_seq_id seq) {
    sweep();
    const uint32_t strm  = kv.seq_to_stream[seq];
    const auto &   cells = kv.v_cells[strm];
    std::vector<llama_pos> res;
    for (uint32_t slot = 0; slot < n_slots; ++slot) {
        const int32_t c = slot_to_cell[size_t(strm)*n_slots + slot];
        if (c >= 0 && cells.seq_has(c, seq)) {
            res.push_back(cells.pos_get(c));
        }
    }
    std::sort(res.begin(), res.end());
    return res;
}

uint32_t logquant_overlay::slots_used() {
    sweep();
    uint32_t used = 0;
    for (uint32_t strm = 0; strm < n_stream; ++strm) {
        used += n_slots - uint32_t(free_slots[strm].size());
    }
    return used;
}

ggml_tensor * logquant_overlay::build_attn(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k_cur, ggml_tensor * v_cur,
                                           ggml_tensor * k, ggml_tensor * v, ggml_tensor * kq_mask, float kq_scale,
                                           const llama_hparams & hparams, int il) {
    const int32_t ikv = kv.map_layer_ids.at(il);
    logquant_attn_layer & lp = layer_params.at(il);
    lp.scale         = kq_scale;
    lp.max_bias      = hparams.f_max_alibi_bias;
    lp.logit_softcap = hparams.attn_soft_cap ? hparams.f_attn_logit_softcapping : 0.0f;

    // the same views as build_attn_mha: q split into streams, then [D, tokens, heads, streams]
    const int64_t ns = k->ne[3];
    q = ggml_view_4d(ctx, q, q->ne[0], q->ne[1], q->ne[2]/ns, ns, q->nb[1], q->nb[2], q->nb[2]*(q->ne[2]/ns), 0);
    q = ggml_permute(ctx, q, 0, 2, 1, 3);
    k = ggml_permute(ctx, k, 0, 2, 1, 3);
    v = ggml_permute(ctx, v, 0, 2, 1, 3);

    ggml_tensor * write = nullptr;
    if (k_cur != nullptr && v_cur != nullptr) {
        ggml_tensor * args[] = { k_cur, v_cur, k_ov[ikv], v_ov[ikv] };
        write = ggml_custom_4d(ctx, GGML_TYPE_F32, 1, 1, 1, 1, args, 4, logquant_overlay_write, GGML_N_TASKS_MAX, &lp);
        ggml_format_name(write, "logquant_overlay_write-%d", il);
    }

    ggml_tensor * args[] = { q, k, v, kq_mask, k_ov[ikv], v_ov[ikv], write };
    ggml_tensor * cur = ggml_custom_4d(ctx, GGML_TYPE_F32, v->ne[0], q->ne[2], q->ne[1], q->ne[3], args,
                                       write ? 7 : 6, logquant_attn_compute, GGML_N_TASKS_MAX, &lp);
    ggml_format_name(cur, "logquant_attn-%d", il);

    return ggml_reshape_2d(ctx, cur, cur->ne[0]*cur->ne[1], cur->ne[2]*cur->ne[3]);
}

logquant_overlay * logquant_overlay_of(const llama_kv_cache_context * mctx) {
    return mctx != nullptr ? mctx->kv->lq_overlay.get() : nullptr;
}

ggml_tensor * logquant_build_attn(ggml_context * ctx, const llama_kv_cache_context * mctx, ggml_tensor * q,
                                  ggml_tensor * k_cur, ggml_tensor * v_cur, ggml_tensor * k, ggml_tensor * v,
                                  ggml_tensor * kq_mask, ggml_tensor * kq_b, ggml_tensor * sinks, ggml_tensor * v_mla,
                                  float kq_scale, const llama_hparams & hparams, int il) {
    // logquant_overlay_enable refuses models that would need these
    GGML_ASSERT(kq_b == nullptr && sinks == nullptr && v_mla == nullptr);
    return logquant_overlay_of(mctx)->build_attn(ctx, q, k_cur, v_cur, k, v, kq_mask, kq_scale, hparams, il);
}

//
// C API (include/logquant.h)
//

static thread_local std::string g_last_error;

static int32_t fail(int32_t code, const std::string & msg) {
    g_last_error = msg;
    return code;
}

const char * logquant_last_error(void) {
    return g_last_error.c_str();
}

// The KV caches of a context: one, or two for models with sliding-window layers.
static std::vector<llama_kv_cache *> caches_of(const llama_context * ctx) {
    std::vector<llama_kv_cache *> res;
    llama_memory_t mem = ctx != nullptr ? llama_get_memory(ctx) : nullptr;
    if (auto * kv = dynamic_cast<llama_kv_cache *>(mem)) {
        res.push_back(kv);
    } else if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        res.push_back(iswa->get_base());
        res.push_back(iswa->get_swa());
    }
    return res;
}

int32_t logquant_overlay_enable(struct llama_context * ctx, uint32_t n_slots) {
    if (ctx == nullptr) {
        return fail(LOGQUANT_ERR_ARGUMENT, "no context");
    }
    const auto caches = caches_of(ctx);
    if (caches.empty()) {
        return fail(LOGQUANT_ERR_UNSUPPORTED, "this context has no KV cache the overlay can extend (recurrent or hybrid model)");
    }
    if (!ctx->get_cparams().flash_attn) {
        return fail(LOGQUANT_ERR_UNSUPPORTED, "the two-tier cache needs flash attention on (-fa on)");
    }
    const llama_model & model = ctx->get_model();
    if (model.hparams.is_mla()) {
        return fail(LOGQUANT_ERR_UNSUPPORTED, "models with multi-head latent attention are not supported by the two-tier cache");
    }
    for (const auto & layer : model.layers) {
        if (layer.attn_sinks != nullptr) {
            return fail(LOGQUANT_ERR_UNSUPPORTED, "models with attention sinks are not supported by the two-tier cache");
        }
    }
    if (model.arch == LLM_ARCH_T5 || model.arch == LLM_ARCH_T5ENCODER) {
        return fail(LOGQUANT_ERR_UNSUPPORTED, "models with a relative-position attention bias (T5) are not supported by the two-tier cache");
    }
    if (ctx->get_cparams().kv_unified && llama_n_seq_max(ctx) > 1) {
        return fail(LOGQUANT_ERR_UNSUPPORTED, "a unified KV cache shared by several sequences is not supported by the two-tier cache (one stream per sequence: kv_unified = false)");
    }
    llama_memory_t mem = llama_get_memory(ctx);
    for (llama_seq_id s = 0; s < (llama_seq_id) llama_n_seq_max(ctx); ++s) {
        if (llama_memory_seq_pos_max(mem, s) >= 0) {
            return fail(LOGQUANT_ERR_STATE, "the overlay must be enabled before the first token is decoded");
        }
    }
    for (auto * kv : caches) {
        if (kv->lq_overlay) {
            return fail(LOGQUANT_ERR_STATE, "the overlay is already enabled on this context");
        }
    }
    try {
        for (auto * kv : caches) {
            kv->lq_overlay = std::make_shared<logquant_overlay>(*kv, n_slots);
        }
    } catch (const std::exception & e) {
        for (auto * kv : caches) {
            kv->lq_overlay.reset();
        }
        return fail(LOGQUANT_ERR_MEMORY, e.what());
    }
    return 0;
}

static bool seq_ok(const llama_context * ctx, llama_seq_id seq) {
    return ctx != nullptr && seq >= 0 && (uint32_t) seq < llama_n_seq_max(ctx);
}

int32_t logquant_seq_set_full_precision(struct llama_context * ctx, llama_seq_id seq, const llama_pos * pos, size_t n) {
    if (!seq_ok(ctx, seq) || (pos == nullptr && n > 0)) {
        return fail(LOGQUANT_ERR_ARGUMENT, "invalid context, sequence id or position list");
    }
    if (!std::is_sorted(pos, pos + n)) {
        return fail(LOGQUANT_ERR_ARGUMENT, "positions must be sorted ascending");
    }
    bool any = false;
    for (auto * kv : caches_of(ctx)) {
        if (kv->lq_overlay) {
            kv->lq_overlay->set_full_precision(seq, pos, n);
            any = true;
        }
    }
    return any ? 0 : fail(LOGQUANT_ERR_STATE, "the overlay is not enabled on this context");
}

int64_t logquant_seq_full_precision(struct llama_context * ctx, llama_seq_id seq, llama_pos * out, size_t cap) {
    if (!seq_ok(ctx, seq) || (out == nullptr && cap > 0)) {
        return fail(LOGQUANT_ERR_ARGUMENT, "invalid context, sequence id or output buffer");
    }
    const auto caches = caches_of(ctx);
    if (caches.empty() || !caches[0]->lq_overlay) {
        return fail(LOGQUANT_ERR_STATE, "the overlay is not enabled on this context");
    }
    const auto pos = caches[0]->lq_overlay->full_precision(seq);
    std::copy_n(pos.begin(), std::min(cap, pos.size()), out);
    return (int64_t) pos.size();
}

bool logquant_overlay_get_stats(const struct llama_context * ctx, struct logquant_overlay_stats * out) {
    if (ctx == nullptr || out == nullptr) {
        return false;
    }
    logquant_overlay_stats st = {};
    for (auto * kv : caches_of(ctx)) {
        if (const auto & ov = kv->lq_overlay) {
            st.enabled = true;
            st.slots_per_stream = std::max(st.slots_per_stream, ov->n_slots);
            st.slots_used += ov->slots_used();
            st.misses += ov->misses;
            for (const auto & buf : ov->bufs) {
                const bool host = ggml_backend_buffer_is_host(buf.get());
                (host ? st.bytes_host : st.bytes_device) += ggml_backend_buffer_get_size(buf.get());
            }
        }
    }
    *out = st;
    return true;
}

bool logquant_attn_run(const struct logquant_attn_case * c) {
    if (c == nullptr || c->q == nullptr || c->k_store == nullptr || c->v_store == nullptr || c->mask == nullptr ||
        c->out == nullptr || c->slot_to_cell == nullptr && c->n_slots > 0) {
        return false;
    }
    const int64_t D = c->head_dim;
    if (D <= 0 || D % ggml_blck_size(GGML_TYPE_LQ2) != 0 || D > 1024 || c->n_head <= 0 || c->n_head_kv <= 0 ||
        c->n_head % c->n_head_kv != 0 || c->n_tokens <= 0 || c->n_kv <= 0 || c->n_slots < 0 || c->n_threads <= 0 ||
        (c->n_slots > 0 && (c->k_overlay == nullptr || c->v_overlay == nullptr))) {
        return false;
    }
    std::vector<int32_t> cell_to_slot(c->n_kv, -1);
    for (int32_t s = 0; s < c->n_slots; ++s) {
        const int32_t cell = c->slot_to_cell[s];
        if (cell < -1 || cell >= c->n_kv || (cell >= 0 && cell_to_slot[cell] >= 0)) {
            return false;
        }
        if (cell >= 0) {
            cell_to_slot[cell] = s;
        }
    }
    ggml_cpu_init();

    const int64_t rows = std::max<int64_t>(c->n_slots, 1);
    // ggml_init aborts when it cannot allocate: keep test cases to a sane size.
    if (int64_t(c->n_kv) * c->n_head_kv * D > (int64_t(1) << 26) || int64_t(c->n_tokens) * c->n_head * D > (int64_t(1) << 26) ||
        int64_t(c->n_kv) * c->n_tokens > (int64_t(1) << 26) || rows * c->n_head_kv * D > (int64_t(1) << 26)) {
        return false;
    }
    const size_t data = sizeof(float)*D*c->n_head*c->n_tokens*2 + 2*ggml_row_size(GGML_TYPE_LQ2, D)*c->n_head_kv*c->n_kv +
                        2*sizeof(ggml_fp16_t)*D*c->n_head_kv*rows + sizeof(ggml_fp16_t)*c->n_kv*c->n_tokens;
    ggml_init_params params = { data + 64*ggml_tensor_overhead() + ggml_graph_overhead() + (1 << 16), nullptr, false };
    ggml_context * ctx = ggml_init(params);
    if (ctx == nullptr) {
        return false;
    }
    ggml_tensor * q  = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, D, c->n_head, c->n_tokens);
    ggml_tensor * k  = ggml_new_tensor_3d(ctx, GGML_TYPE_LQ2, D, c->n_head_kv, c->n_kv);
    ggml_tensor * v  = ggml_new_tensor_3d(ctx, GGML_TYPE_LQ2, D, c->n_head_kv, c->n_kv);
    ggml_tensor * m  = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, c->n_kv, c->n_tokens, 1, 1);
    ggml_tensor * ko = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, D*c->n_head_kv, rows);
    ggml_tensor * vo = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, D*c->n_head_kv, rows);
    memcpy(q->data, c->q, ggml_nbytes(q));
    memcpy(k->data, c->k_store, ggml_nbytes(k));
    memcpy(v->data, c->v_store, ggml_nbytes(v));
    ggml_cpu_fp32_to_fp16(c->mask, (ggml_fp16_t *) m->data, int64_t(c->n_kv)*c->n_tokens);
    memset(ko->data, 0, ggml_nbytes(ko));
    memset(vo->data, 0, ggml_nbytes(vo));
    if (c->n_slots > 0) {
        memcpy(ko->data, c->k_overlay, ggml_nbytes(ko));
        memcpy(vo->data, c->v_overlay, ggml_nbytes(vo));
    }

    logquant_attn_state state = {};
    state.n_slots      = c->n_slots;
    state.n_cells      = c->n_kv;
    state.slot_to_cell = c->slot_to_cell;
    state.cell_to_slot = cell_to_slot.data();
    state.n_tokens     = c->n_tokens;
    logquant_attn_layer layer = { &state, c->scale, 0.0f, 0.0f };

    // the layout the cache hands to the kernel: [D, tokens, heads, 1] and [D, cells, kv heads, 1]
    ggml_tensor * args[] = {
        ggml_permute(ctx, ggml_reshape_4d(ctx, q, D, c->n_head, c->n_tokens, 1), 0, 2, 1, 3),
        ggml_permute(ctx, ggml_reshape_4d(ctx, k, D, c->n_head_kv, c->n_kv, 1), 0, 2, 1, 3),
        ggml_permute(ctx, ggml_reshape_4d(ctx, v, D, c->n_head_kv, c->n_kv, 1), 0, 2, 1, 3),
        m, ko, vo,
    };
    ggml_tensor * out = ggml_custom_4d(ctx, GGML_TYPE_F32, D, c->n_head, c->n_tokens, 1, args, 6,
                                       logquant_attn_compute, GGML_N_TASKS_MAX, &layer);
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);
    const bool ok = ggml_graph_compute_with_ctx(ctx, gf, c->n_threads) == GGML_STATUS_SUCCESS;
    if (ok) {
        memcpy(c->out, out->data, ggml_nbytes(out));
    }
    ggml_free(ctx);
    return ok;
}
