// LogQuant's precision overlay; see logquant-overlay.h and include/logquant.h.
#include "logquant-overlay.h"

#include "logquant.h"

#include "llama-context.h"
#include "llama-hparams.h"
#include "llama-kv-cache-iswa.h"
#include "llama-model.h"

#include "ggml-cpu.h"
#include "ggml-lq2.h"

#include <algorithm>
#include <atomic>
#include <functional>
#include <map>
#include <string>
#include <thread>

// Keys by channel: at most this many demoted rows per stream wait for their group
// (two groups: a policy whose newest window is shorter than a group fills one while
// the previous one completes).
#define LOGQUANT_PENDING_ROWS (2*QK_LQ2)

// Runs fn(i) for every i in [0, n) on up to 16 threads: the host-side requantization
// of centering's freeze and of keys by channel (~100 ms of one core per 64 tokens of
// an 8B model) would otherwise stall the decode loop.
template <class Fn> static void parallel_for(size_t n, Fn fn) {
    const size_t nt = std::min<size_t>(n, std::clamp<unsigned>(std::thread::hardware_concurrency(), 1u, 16u));
    if (nt <= 1) {
        for (size_t i = 0; i < n; ++i) {
            fn(i);
        }
        return;
    }
    std::atomic<size_t> next{ 0 };
    std::vector<std::thread> threads;
    for (size_t t = 0; t < nt; ++t) {
        threads.emplace_back([&] {
            for (size_t i = next++; i < n; i = next++) {
                fn(i);
            }
        });
    }
    for (auto & t : threads) {
        t.join();
    }
}

// std::erase_if for a map, in C++17.
template <class Map, class Pred> static void erase_where(Map & m, Pred pred) {
    for (auto it = m.begin(); it != m.end();) {
        it = pred(*it) ? m.erase(it) : std::next(it);
    }
}

// The two-tier attention op over fresh tensors of the layout the cache hands to the
// kernel: q [D, tokens, heads, 1], K and V [D, cells, kv heads, 1], the mask, the
// overlay's K and V rows and the slot -> cell map (`rows` slots).
struct attn_op {
    ggml_tensor * q, * k, * v, * mask, * k_ov, * v_ov, * s2c, * kbc, * out;
};

// by_channel: with the keys-by-channel flags source (kbc [n_kv/64, 1] I32), else without.
// k_type: the K store's type (the V store is lq2).
static attn_op new_attn_op(ggml_context * ctx, int64_t D, int64_t n_head, int64_t n_head_kv, int64_t n_tokens,
                           int64_t n_kv, int64_t rows, logquant_attn_layer * layer, bool by_channel = false,
                           ggml_type k_type = GGML_TYPE_LQ2) {
    attn_op op;
    op.q    = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, D, n_head, n_tokens);
    op.k    = ggml_new_tensor_3d(ctx, k_type, D, n_head_kv, n_kv);
    op.v    = ggml_new_tensor_3d(ctx, GGML_TYPE_LQ2, D, n_head_kv, n_kv);
    op.mask = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, n_kv, n_tokens, 1, 1);
    op.k_ov = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, D*n_head_kv, rows);
    op.v_ov = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, D*n_head_kv, rows);
    op.s2c  = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, rows, 1);
    op.kbc  = by_channel ? ggml_new_tensor_2d(ctx, GGML_TYPE_I32, n_kv/QK_LQ2, 1) : nullptr;
    ggml_tensor * args[] = {
        ggml_permute(ctx, ggml_reshape_4d(ctx, op.q, D, n_head, n_tokens, 1), 0, 2, 1, 3),
        ggml_permute(ctx, ggml_reshape_4d(ctx, op.k, D, n_head_kv, n_kv, 1), 0, 2, 1, 3),
        ggml_permute(ctx, ggml_reshape_4d(ctx, op.v, D, n_head_kv, n_kv, 1), 0, 2, 1, 3),
        op.mask, op.k_ov, op.v_ov, op.s2c, op.kbc,
    };
    op.out = ggml_custom_4d(ctx, GGML_TYPE_F32, D, n_head, n_tokens, 1, args, by_channel ? 8 : 7, logquant_attn_compute,
                            GGML_N_TASKS_MAX, layer);
    return op;
}

// Whether device dev runs the two-tier attention op for heads of size D, asked as the
// scheduler asks (with a stand-in op of that shape): what a device refuses, the
// scheduler would run on the CPU, copying the whole cache there every step.
static bool attn_runs_on(ggml_backend_dev_t dev, int64_t D, int64_t n_head_kv, bool by_channel, ggml_type k_type) {
    if (dev == nullptr) {
        return false;
    }
    ggml_init_params params = { 32*ggml_tensor_overhead(), nullptr, true };
    ggml_context * ctx = ggml_init(params);
    if (ctx == nullptr) {
        return false;
    }
    logquant_attn_layer layer = { nullptr, 1.0f, 0.0f, 0.0f };
    const bool ok = ggml_backend_dev_supports_op(dev, new_attn_op(ctx, D, n_head_kv, n_head_kv, 1, 256, 1, &layer, by_channel, k_type).out);
    ggml_free(ctx);
    return ok;
}

logquant_overlay::logquant_overlay(llama_kv_cache & kv, uint32_t n_slots, uint32_t flags, llama_context * lctx)
    : kv(kv), n_slots(std::min(n_slots, kv.get_size())), n_cells(kv.get_size()), n_stream(kv.n_stream),
      center_k((flags & LOGQUANT_CENTER_K) != 0), center_v((flags & LOGQUANT_CENTER_V) != 0),
      keys_by_channel((flags & LOGQUANT_KEYS_BY_CHANNEL) != 0), lctx(lctx) {
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
        ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(layer.k->buffer);
        if (keys_by_channel && layer.k->type != GGML_TYPE_LQ2 && layer.k->type != GGML_TYPE_LQ3) {
            throw std::runtime_error(std::string("keys by channel need an lq2 or lq3 K store, not ") + ggml_type_name(layer.k->type));
        }
        // The two-tier kernels exist for the CPU and CUDA; elsewhere every step would
        // copy the whole cache to the host.
        if (!ggml_backend_buffer_is_host(layer.k->buffer) && std::string(ggml_backend_buft_name(buft)).rfind("CUDA", 0) != 0) {
            throw std::runtime_error(std::string("the KV cache lives on ") + ggml_backend_buft_name(buft) +
                                     ", where the two-tier kernels do not run (CPU and CUDA only)");
        }
        if (!ggml_backend_buffer_is_host(layer.k->buffer)) {
            // what the CUDA kernel runs (logquant_cuda_supports_op); elsewhere the
            // scheduler would copy the whole cache to the CPU every step
            if ((layer.k->type != GGML_TYPE_LQ2 && layer.k->type != GGML_TYPE_LQ3) || layer.v->type != GGML_TYPE_LQ2) {
                throw std::runtime_error(std::string("the CUDA two-tier kernel reads an lq2 or lq3 K store and an lq2 V store, not ") +
                                         ggml_type_name(layer.k->type) + "/" + ggml_type_name(layer.v->type) +
                                         ": keep the cache on the CPU (--ngl 0)");
            }
            const uint32_t dk = kv.hparams.n_embd_head_k(layer.il);
            const uint32_t dv = kv.hparams.n_embd_head_v(layer.il);
            if (dk != dv || (dk != 64 && dk != 128 && dk != 256)) {
                throw std::runtime_error("head size " + std::to_string(dk) + " (K) / " + std::to_string(dv) +
                                         " (V) is not one the CUDA two-tier kernel runs (64, 128 or 256, K = V): keep the "
                                         "cache on the CPU (--ngl 0) or use one of llama.cpp's cache types");
            }
            if (!attn_runs_on(ggml_backend_buft_get_device(buft), dk, layer.k->ne[0]/dk, keys_by_channel, layer.k->type)) {
                throw std::runtime_error(std::string("the two-tier attention does not run on ") + ggml_backend_buft_name(buft) +
                                         " (its kernel needs NVIDIA compute capability 8.0, Ampere, or newer on every "
                                         "GPU): keep the cache on the CPU (--ngl 0) or use one of llama.cpp's cache types");
            }
        }
        auto it = ctx_for.find(buft);
        if (it == ctx_for.end()) {
            ggml_init_params params = {
                /*.mem_size   =*/ size_t(4u*kv.layers.size()*(1 + n_stream))*ggml_tensor_overhead(),
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
        if (center_k || center_v) {
            // both, whichever is centered: a few KiB, and one layout for the graph
            ggml_tensor * ko = ggml_new_tensor_2d(it->second, GGML_TYPE_F32, layer.k->ne[0], n_stream);
            ggml_tensor * vo = ggml_new_tensor_2d(it->second, GGML_TYPE_F32, layer.v->ne[0], n_stream);
            ggml_format_name(ko, "logquant_offset_k_l%d", layer.il);
            ggml_format_name(vo, "logquant_offset_v_l%d", layer.il);
            k_off.push_back(ko);
            v_off.push_back(vo);
        }
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
    for (uint32_t strm = 0; strm < n_stream; ++strm) {
        reset_slots(strm);
    }
    frozen.assign(n_stream, 0);
    if (keys_by_channel) {
        if (n_cells % QK_LQ2 != 0) {
            throw std::runtime_error("keys by channel need a cache size that is a multiple of 64 cells");
        }
        n_groups = n_cells / QK_LQ2;
        k_by_channel.assign(size_t(n_stream)*n_groups, 0);
        written_groups.resize(n_stream);
        pending.resize(n_stream);
        k_row_offs.assign(1, 0);
        for (const auto & layer : kv.layers) {
            k_row_offs.push_back(k_row_offs.back() + size_t(layer.k->ne[0]));
        }
        state.k_by_channel = k_by_channel.data();
        // No Hadamard rotation of K: it spreads a channel's offset and scale over the
        // head, the structure quantizing by channel exploits (Qwen2.5-Coder-0.5B, 4096
        // tokens of code, logquant:D=384: mean KLD 0.79 rotated, 0.046 not). The graphs
        // built from now on (the overlay comes before the first decode) have none.
        kv.n_rot_k = 0;
    }
    state.n_slots      = int32_t(this->n_slots);
    state.n_cells      = int32_t(n_cells);
    state.slot_to_cell = slot_to_cell.data();
    state.cell_to_slot = cell_to_slot.data();
    layer_params.assign(kv.hparams.n_layer(), logquant_attn_layer{ &state, 1.0f, 0.0f, 0.0f });
}

void logquant_overlay::reset_slots(uint32_t strm) {
    for (uint32_t slot = 0; slot < n_slots; ++slot) {
        const int32_t c = slot_to_cell[size_t(strm)*n_slots + slot];
        if (c >= 0) {
            cell_to_slot[size_t(strm)*n_cells + c] = -1;
            slot_to_cell[size_t(strm)*n_slots + slot] = -1;
        }
    }
    auto & fs = free_slots[strm];
    fs.clear();
    // popped from the back: slot 0 first
    for (int32_t s = int32_t(n_slots) - 1; s >= 0; --s) {
        fs.push_back(s);
    }
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
        sweep(strm);
    }
}

void logquant_overlay::sweep(uint32_t strm) {
    const auto & cells = kv.v_cells[strm];
    for (uint32_t slot = 0; slot < n_slots; ++slot) {
        const int32_t c = slot_to_cell[size_t(strm)*n_slots + slot];
        if (c >= 0 && cells.is_empty(c)) {
            free_slot(strm, int32_t(slot));
        }
    }
    if (keys_by_channel) {
        erase_where(pending[strm], [&](const auto & e) { return cells.is_empty(e.first); });
    }
}

void logquant_overlay::on_ubatch(const llama_kv_cache::slot_info & sinfo, const llama_ubatch & ubatch) {
    sweep();
    if (keys_by_channel) {
        uncode_written(sinfo);
    }
    token_row.assign(ubatch.n_tokens, -1);
    for (uint32_t s = 0; s < sinfo.n_stream(); ++s) {
        const uint32_t strm = sinfo.strm[s];
        if (kv.v_cells[strm].get_used() == sinfo.size()) {
            // The stream held nothing before this micro-batch: it starts as a fresh one
            // (the same slots in the same order, whatever it held before), so a sequence's
            // results do not depend on the stream's history.
            reset_slots(strm);
            if (frozen[strm]) {
                reset_offsets(strm);
            }
            if (keys_by_channel) {
                std::fill_n(k_by_channel.begin() + size_t(strm)*n_groups, n_groups, 0);
                pending[strm].clear();
            }
        }
        for (uint32_t ii = 0; ii < sinfo.size(); ++ii) {
            const uint32_t i    = s*sinfo.size() + ii;
            const uint32_t cell = sinfo.idxs[s][ii];
            if (keys_by_channel) {
                if (written_groups[strm].empty() || written_groups[strm].back() != cell/QK_LQ2) {
                    written_groups[strm].push_back(cell/QK_LQ2);
                }
                pending[strm].erase(cell); // a new token: its old row is no longer the cell's
            }
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
            token_row[i] = int32_t((strm - sinfo.s0)*n_slots) + slot; // rows of the micro-batch's streams
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
    frozen[sdst]     = frozen[ssrc];
    if (keys_by_channel) {
        std::copy_n(k_by_channel.begin() + size_t(ssrc)*n_groups, n_groups, k_by_channel.begin() + size_t(sdst)*n_groups);
        written_groups[sdst] = written_groups[ssrc];
        pending[sdst]        = pending[ssrc];
    }
}

// Copies rows [ssrc*n, ssrc*n + n) of t over rows [sdst*n, ...).
static void copy_rows(ggml_tensor * t, uint32_t ssrc, uint32_t sdst, uint32_t n_rows) {
    const size_t n = t->nb[1]*n_rows;
    std::vector<uint8_t> tmp(n);
    ggml_backend_tensor_get(t, tmp.data(), n*ssrc, n);
    ggml_backend_tensor_set(t, tmp.data(), n*sdst, n);
}

void logquant_overlay::copy_stream(uint32_t ssrc, uint32_t sdst) {
    for (size_t il = 0; il < k_ov.size() && n_slots > 0; ++il) {
        copy_rows(k_ov[il], ssrc, sdst, n_slots);
        copy_rows(v_ov[il], ssrc, sdst, n_slots);
    }
    for (size_t il = 0; il < k_off.size(); ++il) {
        copy_rows(k_off[il], ssrc, sdst, 1);
        copy_rows(v_off[il], ssrc, sdst, 1);
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
        if (keys_by_channel) { // their rows are about to change
            erase_where(pending[strm], [&](const auto & e) { return !cells.is_empty(e.first) && cells.get_shift(e.first) != 0; });
        }
    }
}

void logquant_overlay::forget(llama_seq_id seq) {
    sweep();
    before_row_access(); // the restore writes per-token rows into the stream's cells
    for (uint32_t strm = 0; strm < n_stream; ++strm) {
        const auto & cells = kv.v_cells[strm];
        for (uint32_t slot = 0; slot < n_slots; ++slot) {
            const int32_t c = slot_to_cell[size_t(strm)*n_slots + slot];
            if (c >= 0 && (seq < 0 || cells.seq_has(c, seq))) {
                free_slot(strm, int32_t(slot));
            }
        }
        if (keys_by_channel) {
            erase_where(pending[strm], [&](const auto & e) { return seq < 0 || cells.seq_has(e.first, seq); });
        }
    }
}

void logquant_overlay::set_full_precision(llama_seq_id seq, const llama_pos * pos, size_t n) {
    const uint32_t strm  = kv.seq_to_stream[seq];
    sweep(strm); // this stream only: called for every sequence after every decode
    const auto &   cells = kv.v_cells[strm];
    if ((center_k || center_v) && !frozen[strm] && cells.get_used() >= LOGQUANT_CENTER_TOKENS) {
        freeze_offsets(strm, seq); // before any demotion: every token is still in the overlay
    }
    if (keys_by_channel) {
        code_by_channel(strm); // also before any demotion: from the f16 copies
        hold_demoted(strm, seq, pos, n);
    }
    for (uint32_t slot = 0; slot < n_slots; ++slot) {
        const int32_t c = slot_to_cell[size_t(strm)*n_slots + slot];
        if (c >= 0 && cells.seq_has(c, seq) && !std::binary_search(pos, pos + n, cells.pos_get(c))) {
            free_slot(strm, int32_t(slot));
        }
    }
}

std::vector<llama_pos> logquant_overlay::full_precision(llama_seq_id seq) {
    const uint32_t strm  = kv.seq_to_stream[seq];
    sweep(strm);
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

void logquant_overlay::freeze_offsets(uint32_t strm, llama_seq_id seq) {
    const auto & cells = kv.v_cells[strm];
    std::vector<uint32_t> held; // the stream's cells, in cell order
    bool past_first = false;    // some token after position 0
    for (uint32_t c = 0; c < n_cells; ++c) {
        if (!cells.is_empty(c) && cells.seq_has(c, seq)) {
            held.push_back(c);
            past_first = past_first || cells.pos_get(c) > 0;
        }
    }
    if (held.empty()) {
        return;
    }
    sync();
    const uint32_t c0 = held.front(), n_range = held.back() - c0 + 1;
    const uint32_t rows = std::max<uint32_t>(n_slots, 1);
    if (keys_by_channel) {
        uncode_stream(strm); // below, rows are read and written one token at a time
        pending[strm].clear(); // uncentered rows
    }

    // The overlay rows of the held cells: slots [s0, s1). A stream hands out its slots in
    // order from a fresh start, so after a sequence's first chunk these are about its
    // tokens alone; moving every slot's row (D + a micro-batch of them, both ways, per
    // layer) was most of a freeze on a GPU.
    uint32_t s0 = n_slots, s1 = 0;
    for (const uint32_t c : held) {
        const int32_t slot = cell_to_slot[size_t(strm)*n_cells + c];
        if (slot >= 0) {
            s0 = std::min(s0, uint32_t(slot));
            s1 = std::max(s1, uint32_t(slot) + 1);
        }
    }
    if (s1 <= s0) {
        s0 = s1 = 0;
    }

    // One job per (layer, K or V), on all cores (the requantization is ~100 ms of one
    // core for 64 tokens of an 8B model): each reads, computes and writes its rows.
    struct job {
        ggml_tensor * store, * ov, * off;
        std::vector<uint8_t>     store_rows;
        std::vector<ggml_fp16_t> ov_rows;
        std::vector<float>       mean;
    };
    std::vector<job> jobs;
    for (size_t ikv = 0; ikv < kv.layers.size(); ++ikv) {
        if (center_k) {
            jobs.push_back({ kv.layers[ikv].k, k_ov[ikv], k_off[ikv], {}, {}, {} });
        }
        if (center_v) {
            jobs.push_back({ kv.layers[ikv].v, v_ov[ikv], v_off[ikv], {}, {}, {} });
        }
    }
    for (auto & jb : jobs) {
        GGML_ASSERT(ggml_get_type_traits(jb.store->type)->to_float != nullptr &&
                    ggml_get_type_traits_cpu(jb.store->type)->from_float != nullptr);
    }
    // Each job reads, computes and writes on its own thread: on a GPU every copy is a
    // synchronous transfer of a few KiB (its latency, not its bytes, is the cost), and
    // ggml-cuda copies on the calling thread's own stream, so the copies overlap too.
    parallel_for(jobs.size(), [&](size_t ij) {
        job & jb = jobs[ij];
        // the held tokens' values: the f16 copy where the overlay has one, else the store's
        jb.store_rows.resize(size_t(n_range)*jb.store->nb[1]);
        jb.ov_rows.resize(size_t(s1 - s0)*jb.store->ne[0]);
        ggml_backend_tensor_get(jb.store, jb.store_rows.data(), size_t(strm)*jb.store->nb[2] + size_t(c0)*jb.store->nb[1],
                                jb.store_rows.size());
        if (s1 > s0) {
            ggml_backend_tensor_get(jb.ov, jb.ov_rows.data(), (size_t(strm)*rows + s0)*jb.ov->nb[1],
                                    jb.ov_rows.size()*sizeof(ggml_fp16_t));
        }
        const int64_t n_embd = jb.store->ne[0];
        const auto *  traits = ggml_get_type_traits(jb.store->type);
        const auto *  cpu    = ggml_get_type_traits_cpu(jb.store->type);
        const size_t  nb1    = jb.store->nb[1];
        std::vector<float> x(held.size()*n_embd);
        for (size_t i = 0; i < held.size(); ++i) {
            float * xi = x.data() + i*n_embd;
            const int32_t slot = cell_to_slot[size_t(strm)*n_cells + held[i]];
            if (slot >= 0) {
                ggml_fp16_to_fp32_row(jb.ov_rows.data() + size_t(slot - s0)*n_embd, xi, n_embd);
            } else {
                traits->to_float(jb.store_rows.data() + size_t(held[i] - c0)*nb1, xi, n_embd);
            }
        }
        // the offset: each channel's mean over the tokens after position 0, whose
        // values are often far from the others' (an attention sink)
        std::vector<double> sum(n_embd, 0.0);
        size_t n_mean = 0;
        for (size_t i = 0; i < held.size(); ++i) {
            if (past_first && cells.pos_get(held[i]) == 0) {
                continue;
            }
            for (int64_t j = 0; j < n_embd; ++j) {
                sum[j] += x[i*n_embd + j];
            }
            n_mean++;
        }
        jb.mean.resize(n_embd);
        for (int64_t j = 0; j < n_embd; ++j) {
            jb.mean[j] = float(sum[j]/double(n_mean));
        }
        // both tiers of the held tokens, rewritten as centered values
        for (size_t i = 0; i < held.size(); ++i) {
            float * xi = x.data() + i*n_embd;
            for (int64_t j = 0; j < n_embd; ++j) {
                xi[j] -= jb.mean[j];
            }
            cpu->from_float(xi, jb.store_rows.data() + size_t(held[i] - c0)*nb1, n_embd);
            const int32_t slot = cell_to_slot[size_t(strm)*n_cells + held[i]];
            if (slot >= 0) {
                ggml_fp32_to_fp16_row(xi, jb.ov_rows.data() + size_t(slot - s0)*n_embd, n_embd);
            }
        }
        ggml_backend_tensor_set(jb.store, jb.store_rows.data(), size_t(strm)*jb.store->nb[2] + size_t(c0)*jb.store->nb[1],
                                jb.store_rows.size());
        if (s1 > s0) {
            ggml_backend_tensor_set(jb.ov, jb.ov_rows.data(), (size_t(strm)*rows + s0)*jb.ov->nb[1],
                                    jb.ov_rows.size()*sizeof(ggml_fp16_t));
        }
        ggml_backend_tensor_set(jb.off, jb.mean.data(), size_t(strm)*jb.off->nb[1], jb.mean.size()*sizeof(float));
    });
    frozen[strm] = 1;
}

void logquant_overlay::reset_offsets(uint32_t strm) {
    for (size_t ikv = 0; ikv < k_off.size(); ++ikv) {
        for (ggml_tensor * off : { k_off[ikv], v_off[ikv] }) {
            const std::vector<float> zero(off->ne[0], 0.0f);
            ggml_backend_tensor_set(off, zero.data(), size_t(strm)*off->nb[1], zero.size()*sizeof(float));
        }
    }
    frozen[strm] = 0;
}

void logquant_overlay::sync() {
    if (lctx != nullptr) {
        llama_synchronize(lctx);
    }
}

void logquant_overlay::before_row_access() {
    for (uint32_t strm = 0; strm < n_stream && keys_by_channel; ++strm) {
        uncode_stream(strm);
    }
}

void logquant_overlay::uncode_stream(uint32_t strm) {
    for (uint32_t g = 0; g < n_groups; ++g) {
        if (k_by_channel[size_t(strm)*n_groups + g]) {
            uncode_group(strm, g);
        }
    }
}

void logquant_overlay::uncode_written(const llama_kv_cache::slot_info & sinfo) {
    for (uint32_t s = 0; s < sinfo.n_stream(); ++s) {
        const uint32_t strm  = sinfo.strm[s];
        const auto &   cells = kv.v_cells[strm];
        // the marked groups this micro-batch writes into, and how many of their cells it writes
        std::map<uint32_t, uint32_t> written;
        for (uint32_t cell : sinfo.idxs[s]) {
            if (k_by_channel[size_t(strm)*n_groups + cell/QK_LQ2]) {
                written[cell/QK_LQ2]++;
            }
        }
        for (const auto & [g, n_written] : written) {
            // the cells' metadata already holds the micro-batch's tokens
            uint32_t held = 0;
            for (uint32_t c = g*QK_LQ2; c < (g + 1)*QK_LQ2; ++c) {
                held += cells.is_empty(c) ? 0 : 1;
            }
            if (held > n_written) {
                uncode_group(strm, g);
            } else {
                k_by_channel[size_t(strm)*n_groups + g] = 0;
            }
        }
    }
}

void logquant_overlay::code_by_channel(uint32_t strm) {
    const auto & cells = kv.v_cells[strm];
    std::vector<uint32_t> written;
    written.swap(written_groups[strm]);
    std::sort(written.begin(), written.end());
    written.erase(std::unique(written.begin(), written.end()), written.end());
    std::vector<uint32_t> todo;
    for (uint32_t g : written) {
        if (k_by_channel[size_t(strm)*n_groups + g]) {
            continue;
        }
        bool ready = true;
        for (uint32_t c = g*QK_LQ2; c < (g + 1)*QK_LQ2 && ready; ++c) {
            ready = !cells.is_empty(c) && (cell_to_slot[size_t(strm)*n_cells + c] >= 0 || is_pending(strm, c));
        }
        if (ready) {
            todo.push_back(g);
        }
    }
    if (todo.empty()) {
        return;
    }
    sync();
    const uint32_t rows     = std::max<uint32_t>(n_slots, 1);
    const size_t   n_layers = kv.layers.size();
    // the stream's overlay K rows, one read per layer (one transfer where the cache is on a GPU)
    std::vector<std::vector<ggml_fp16_t>> ov_rows(n_layers);
    for (size_t ikv = 0; ikv < n_layers; ++ikv) {
        ggml_tensor * ov = k_ov[ikv];
        ov_rows[ikv].resize(size_t(n_slots)*kv.layers[ikv].k->ne[0]);
        ggml_backend_tensor_get(ov, ov_rows[ikv].data(), size_t(strm)*rows*ov->nb[1], ov_rows[ikv].size()*sizeof(ggml_fp16_t));
    }
    // each (layer, group) coded on all cores, then written here
    std::vector<std::vector<uint8_t>> coded(n_layers*todo.size());
    parallel_for(coded.size(), [&](size_t i) {
        const size_t   ikv    = i / todo.size();
        const uint32_t g      = todo[i % todo.size()];
        ggml_tensor *  store  = kv.layers[ikv].k;
        const int64_t  n_embd = store->ne[0];
        std::vector<float> x(size_t(QK_LQ2)*n_embd);
        for (uint32_t t = 0; t < QK_LQ2; ++t) {
            const int32_t slot = cell_to_slot[size_t(strm)*n_cells + g*QK_LQ2 + t];
            const ggml_fp16_t * row = slot >= 0 ? ov_rows[ikv].data() + size_t(slot)*n_embd
                                                : pending[strm].at(g*QK_LQ2 + t).k.data() + k_row_offs[ikv];
            ggml_fp16_to_fp32_row(row, x.data() + size_t(t)*n_embd, n_embd);
        }
        coded[i].resize(size_t(QK_LQ2)*store->nb[1]); // n_embd blocks
        GGML_ASSERT(ggml_lq_quantize_by_channel(store->type, x.data(), coded[i].data(), n_embd));
    });
    for (size_t i = 0; i < coded.size(); ++i) {
        ggml_tensor * store = kv.layers[i / todo.size()].k;
        const uint32_t g    = todo[i % todo.size()];
        ggml_backend_tensor_set(store, coded[i].data(), size_t(strm)*store->nb[2] + size_t(g)*QK_LQ2*store->nb[1],
                                coded[i].size());
    }
    for (uint32_t g : todo) {
        k_by_channel[size_t(strm)*n_groups + g] = 1;
        pending[strm].erase(pending[strm].lower_bound(g*QK_LQ2), pending[strm].lower_bound((g + 1)*QK_LQ2));
    }
}

bool logquant_overlay::is_pending(uint32_t strm, uint32_t c) const {
    const auto it = pending[strm].find(c);
    return it != pending[strm].end() && !kv.v_cells[strm].is_empty(c) && it->second.pos == kv.v_cells[strm].pos_get(c);
}

void logquant_overlay::hold_demoted(uint32_t strm, llama_seq_id seq, const llama_pos * pos, size_t n) {
    const auto & cells = kv.v_cells[strm];
    std::vector<std::pair<uint32_t, int32_t>> out; // (cell, slot)
    for (uint32_t slot = 0; slot < n_slots; ++slot) {
        const int32_t c = slot_to_cell[size_t(strm)*n_slots + slot];
        if (c >= 0 && cells.seq_has(c, seq) && !std::binary_search(pos, pos + n, cells.pos_get(c)) &&
            !k_by_channel[size_t(strm)*n_groups + uint32_t(c)/QK_LQ2]) {
            out.emplace_back(uint32_t(c), int32_t(slot));
        }
    }
    if (out.empty()) {
        return;
    }
    sync();
    const uint32_t rows = std::max<uint32_t>(n_slots, 1);
    auto & held = pending[strm];
    for (const auto & [c, slot] : out) {
        held[c] = pending_row{ cells.pos_get(c), std::vector<ggml_fp16_t>(k_row_offs.back()) };
    }
    for (size_t ikv = 0; ikv < kv.layers.size(); ++ikv) {
        ggml_tensor * ov     = k_ov[ikv];
        const int64_t n_embd = kv.layers[ikv].k->ne[0];
        std::vector<ggml_fp16_t> ov_rows(size_t(n_slots)*n_embd); // one read per layer
        ggml_backend_tensor_get(ov, ov_rows.data(), size_t(strm)*rows*ov->nb[1], ov_rows.size()*sizeof(ggml_fp16_t));
        for (const auto & [c, slot] : out) {
            std::copy_n(ov_rows.data() + size_t(slot)*n_embd, n_embd, held[c].k.data() + k_row_offs[ikv]);
        }
    }
    while (held.size() > LOGQUANT_PENDING_ROWS) {
        held.erase(held.begin());
    }
}

void logquant_overlay::uncode_group(uint32_t strm, uint32_t g) {
    sync();
    for (size_t ikv = 0; ikv < kv.layers.size(); ++ikv) {
        ggml_tensor * store = kv.layers[ikv].k;
        const int64_t n_embd = store->ne[0];
        const auto *  cpu    = ggml_get_type_traits_cpu(store->type);
        const size_t  offs   = size_t(strm)*store->nb[2] + size_t(g)*QK_LQ2*store->nb[1];
        std::vector<uint8_t> group(size_t(QK_LQ2)*store->nb[1]), rows(group.size());
        std::vector<float>   x(n_embd);
        ggml_backend_tensor_get(store, group.data(), offs, group.size());
        for (int t = 0; t < QK_LQ2; ++t) {
            GGML_ASSERT(ggml_lq_dequantize_by_channel_row(store->type, group.data(), t, 0, n_embd, x.data()));
            // row t, as set_rows writes a token
            cpu->from_float(x.data(), rows.data() + size_t(t)*store->nb[1], n_embd);
        }
        ggml_backend_tensor_set(store, rows.data(), offs, rows.size());
    }
    k_by_channel[size_t(strm)*n_groups + g] = 0;
}

bool logquant_overlay::read_key(llama_seq_id seq, int32_t il, llama_pos pos, bool from_store, std::vector<float> & out) {
    const auto it = kv.map_layer_ids.find(il);
    if (it == kv.map_layer_ids.end()) {
        return false;
    }
    const uint32_t strm  = kv.seq_to_stream[seq];
    const auto &   cells = kv.v_cells[strm];
    int64_t cell = -1;
    for (uint32_t c = 0; c < n_cells && cell < 0; ++c) {
        if (!cells.is_empty(c) && cells.seq_has(c, seq) && cells.pos_get(c) == pos) {
            cell = c;
        }
    }
    if (cell < 0) {
        return false;
    }
    ggml_tensor * store  = kv.layers[it->second].k;
    const int64_t n_embd = store->ne[0];
    out.resize(n_embd);
    sync();
    if (!from_store) {
        const int32_t slot = cell_to_slot[size_t(strm)*n_cells + cell];
        if (slot < 0) {
            return false;
        }
        ggml_tensor * ov = k_ov[it->second];
        std::vector<ggml_fp16_t> row(n_embd);
        ggml_backend_tensor_get(ov, row.data(), (size_t(strm)*std::max<uint32_t>(n_slots, 1) + slot)*ov->nb[1],
                                row.size()*sizeof(ggml_fp16_t));
        ggml_fp16_to_fp32_row(row.data(), out.data(), n_embd);
        return true;
    }
    const uint32_t g = uint32_t(cell)/QK_LQ2;
    if (keys_by_channel && k_by_channel[size_t(strm)*n_groups + g]) {
        std::vector<uint8_t> group(size_t(QK_LQ2)*store->nb[1]);
        ggml_backend_tensor_get(store, group.data(), size_t(strm)*store->nb[2] + size_t(g)*QK_LQ2*store->nb[1],
                                group.size());
        return ggml_lq_dequantize_by_channel_row(store->type, group.data(), int(cell % QK_LQ2), 0, n_embd, out.data());
    }
    const auto * traits = ggml_get_type_traits(store->type);
    if (traits->to_float == nullptr) {
        return false;
    }
    std::vector<uint8_t> row(store->nb[1]);
    ggml_backend_tensor_get(store, row.data(), size_t(strm)*store->nb[2] + size_t(cell)*store->nb[1], row.size());
    traits->to_float(row.data(), out.data(), n_embd);
    return true;
}

uint32_t logquant_overlay::slots_used() {
    sweep();
    uint32_t used = 0;
    for (uint32_t strm = 0; strm < n_stream; ++strm) {
        used += n_slots - uint32_t(free_slots[strm].size());
    }
    return used;
}

// The graph inputs of one graph: made at the first layer of this cache that the graph
// builds, filled by llama.cpp (set_input) after apply() placed the micro-batch.
struct logquant_overlay::graph_input : llm_graph_input_i {
    graph_input(const logquant_overlay & ov, uint32_t s0, uint32_t n_tokens) : ov(ov), s0(s0), n_tokens(n_tokens) {}

    void set_input(const llama_ubatch * ubatch) override {
        ov.fill_slot_input(s2c, s0);
        if (kbc != nullptr) {
            std::vector<int32_t> buf(ggml_nelements(kbc));
            std::copy_n(ov.k_by_channel.begin() + size_t(s0)*ov.n_groups, buf.size(), buf.begin());
            ggml_backend_tensor_set(kbc, buf.data(), 0, ggml_nbytes(kbc));
        }
        if (rows != nullptr) {
            ov.fill_row_input(rows);
        }
        if (tok_strm != nullptr) {
            GGML_ASSERT(ubatch->n_tokens == uint32_t(tok_strm->ne[0]));
            std::vector<int32_t> buf(ubatch->n_tokens);
            for (uint32_t i = 0; i < ubatch->n_tokens; ++i) {
                buf[i] = int32_t(ov.kv.seq_to_stream[ubatch->seq_id[i][0]] - s0);
            }
            ggml_backend_tensor_set(tok_strm, buf.data(), 0, ggml_nbytes(tok_strm));
        }
    }

    // the graph's overlay views and sizes hold for the next micro-batch when it has as
    // many tokens in the same streams
    bool can_reuse(const llm_graph_params & params) override {
        return params.ubatch.n_tokens == n_tokens && uint32_t(ov.state.s0) == s0;
    }

    const logquant_overlay & ov;
    const uint32_t s0;
    const uint32_t n_tokens;
    ggml_tensor * s2c  = nullptr; // [rows, n_stream] I32
    ggml_tensor * kbc  = nullptr; // [n_groups, n_stream] I32: keys by channel, per group
    ggml_tensor * rows = nullptr; // [n_tokens] I32, when the graph writes tokens
    ggml_tensor * tok_strm = nullptr; // [n_tokens] I32: each token's stream - s0, when
                                      // the graph centers tokens of several streams
};

logquant_overlay::graph_input * logquant_overlay::input_for(ggml_context * ctx, llm_graph_result * res, int il, int stage,
                                                            int64_t ns, ggml_tensor * k_cur) {
    if (inp != nullptr && (il > inp_il || (il == inp_il && stage > inp_stage))) {
        inp_il    = il;
        inp_stage = stage;
        return inp;
    }
    const int64_t rows   = std::max<int64_t>(n_slots, 1);
    const bool    writes = k_cur != nullptr;
    auto gi = std::make_unique<graph_input>(*this, uint32_t(state.s0), uint32_t(writes ? k_cur->ne[2] : 0));
    gi->s2c = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, rows, ns);
    ggml_set_input(gi->s2c);
    ggml_set_name(gi->s2c, "logquant_slot_to_cell");
    if (keys_by_channel) {
        gi->kbc = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, n_groups, ns);
        ggml_set_input(gi->kbc);
        ggml_set_name(gi->kbc, "logquant_keys_by_channel");
    }
    if (writes) {
        gi->rows = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, k_cur->ne[2]);
        ggml_set_input(gi->rows);
        ggml_set_name(gi->rows, "logquant_token_row");
        if ((center_k || center_v) && ns > 1) {
            gi->tok_strm = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, k_cur->ne[2]);
            ggml_set_input(gi->tok_strm);
            ggml_set_name(gi->tok_strm, "logquant_token_stream");
        }
    }
    inp       = gi.get();
    inp_il    = il;
    inp_stage = stage;
    res->add_input(std::move(gi));
    return inp;
}

void logquant_overlay::center(ggml_context * ctx, llm_graph_result * res, ggml_tensor * k, ggml_tensor *& k_cur,
                              ggml_tensor *& v_cur, int il) {
    if (!(center_k || center_v) || k_cur == nullptr || v_cur == nullptr) {
        return;
    }
    // the micro-batch's streams s0 .. s0 + ns - 1, as the store's view k [D, H, n_kv, ns] has them
    const int64_t ns  = k->ne[3];
    const size_t  s0  = k->view_offs/k->nb[3];
    graph_input * gi  = input_for(ctx, res, il, 0, ns, k_cur);
    const int32_t ikv = kv.map_layer_ids.at(il);
    // each token's offsets [D, n_head_kv, n_tokens], or one stream's [D, n_head_kv, 1]
    auto offsets_of = [&](ggml_tensor * off, ggml_tensor * cur) {
        const int64_t D = cur->ne[0], H = cur->ne[1];
        if (gi->tok_strm == nullptr) {
            return ggml_view_3d(ctx, off, D, H, 1, D*sizeof(float), off->nb[1], s0*off->nb[1]);
        }
        ggml_tensor * streams = ggml_view_2d(ctx, off, off->ne[0], ns, off->nb[1], s0*off->nb[1]);
        return ggml_reshape_3d(ctx, ggml_get_rows(ctx, streams, gi->tok_strm), D, H, cur->ne[2]);
    };
    if (center_k) {
        k_cur = ggml_sub(ctx, k_cur, offsets_of(k_off[ikv], k_cur));
    }
    if (center_v) {
        v_cur = ggml_sub(ctx, v_cur, offsets_of(v_off[ikv], v_cur));
    }
}

void logquant_overlay::fill_slot_input(ggml_tensor * s2c, uint32_t s0) const {
    std::vector<int32_t> buf(ggml_nelements(s2c), -1);
    const int64_t ns = s2c->ne[1];
    for (int64_t s = 0; s < ns && n_slots > 0; ++s) {
        std::copy_n(slot_to_cell.begin() + size_t(s0 + s)*n_slots, n_slots, buf.begin() + s*n_slots);
    }
    ggml_backend_tensor_set(s2c, buf.data(), 0, ggml_nbytes(s2c));
}

void logquant_overlay::fill_row_input(ggml_tensor * rows) const {
    GGML_ASSERT(token_row.size() == size_t(rows->ne[0]));
    ggml_backend_tensor_set(rows, token_row.data(), 0, ggml_nbytes(rows));
}

ggml_tensor * logquant_overlay::build_attn(ggml_context * ctx, llm_graph_result * res, ggml_tensor * q, ggml_tensor * k_cur,
                                           ggml_tensor * v_cur, ggml_tensor * k, ggml_tensor * v, ggml_tensor * kq_mask,
                                           float kq_scale, const llama_hparams & hparams, int il) {
    const int32_t ikv = kv.map_layer_ids.at(il);
    logquant_attn_layer & lp = layer_params.at(il);
    lp.scale         = kq_scale;
    lp.max_bias      = hparams.f_max_alibi_bias;
    lp.logit_softcap = hparams.attn_soft_cap ? hparams.f_attn_logit_softcapping : 0.0f;

    // the same views as build_attn_mha: q split into streams, then [D, tokens, heads, streams]
    const int64_t ns = k->ne[3];
    const int64_t s0 = int64_t(k->view_offs/k->nb[3]); // the first of them (state.s0, but also in a reserve graph)
    q = ggml_view_4d(ctx, q, q->ne[0], q->ne[1], q->ne[2]/ns, ns, q->nb[1], q->nb[2], q->nb[2]*(q->ne[2]/ns), 0);
    q = ggml_permute(ctx, q, 0, 2, 1, 3);
    k = ggml_permute(ctx, k, 0, 2, 1, 3);
    v = ggml_permute(ctx, v, 0, 2, 1, 3);

    // the overlay rows of the micro-batch's streams, as the K and V views are
    const int64_t rows = std::max<int64_t>(n_slots, 1);
    ggml_tensor * k_rows = ggml_view_2d(ctx, k_ov[ikv], k_ov[ikv]->ne[0], rows*ns, k_ov[ikv]->nb[1], s0*rows*k_ov[ikv]->nb[1]);
    ggml_tensor * v_rows = ggml_view_2d(ctx, v_ov[ikv], v_ov[ikv]->ne[0], rows*ns, v_ov[ikv]->nb[1], s0*rows*v_ov[ikv]->nb[1]);

    const bool writes = k_cur != nullptr && v_cur != nullptr;
    input_for(ctx, res, il, 1, ns, writes ? k_cur : nullptr);

    // The write is an in-place op on the overlay's K rows: its result is a view of the
    // overlay, so the scheduler runs it where the overlay lives (a write on another
    // backend would land in a copy), and attention, reading that result, runs after it.
    ggml_tensor * k_in = k_rows;
    if (writes) {
        GGML_ASSERT(inp->rows != nullptr && inp->rows->ne[0] == k_cur->ne[2]);
        ggml_tensor * args[] = { k_cur, v_cur, v_rows, inp->rows };
        k_in = ggml_custom_inplace(ctx, k_rows, args, 4, logquant_overlay_write, GGML_N_TASKS_MAX, &lp);
        ggml_format_name(k_in, "logquant_overlay_write-%d", il);
    }

    ggml_tensor * args[] = { q, k, v, kq_mask, k_in, v_rows, inp->s2c, inp->kbc };
    ggml_tensor * cur = ggml_custom_4d(ctx, GGML_TYPE_F32, v->ne[0], q->ne[2], q->ne[1], q->ne[3], args,
                                       inp->kbc ? 8 : 7, logquant_attn_compute, GGML_N_TASKS_MAX, &lp);
    ggml_format_name(cur, "logquant_attn-%d", il);

    if (center_v) {
        // attention returned sum p (v - c) over weights summing to 1: add c back, each
        // KV head's offsets to its query heads [DV, n_head, 1, ns]
        ggml_tensor * off = v_off[ikv];
        const int64_t DV = cur->ne[0], n_head = cur->ne[1], H = off->ne[0]/DV;
        ggml_tensor * c = ggml_view_4d(ctx, off, DV, 1, H, ns, DV*sizeof(float), DV*sizeof(float), off->nb[1],
                                       size_t(s0)*off->nb[1]);
        if (n_head != H) {
            c = ggml_repeat_4d(ctx, c, DV, n_head/H, H, ns);
        }
        cur = ggml_add(ctx, cur, ggml_reshape_4d(ctx, ggml_cont(ctx, c), DV, n_head, 1, ns));
    }

    return ggml_reshape_2d(ctx, cur, cur->ne[0]*cur->ne[1], cur->ne[2]*cur->ne[3]);
}

void logquant_center_kv(ggml_context * ctx, llm_graph_result * res, const llama_kv_cache_context * mctx,
                        ggml_tensor *& k_cur, ggml_tensor *& v_cur, int il) {
    if (logquant_overlay * ov = logquant_overlay_of(mctx)) {
        ov->center(ctx, res, mctx->get_k(ctx, il), k_cur, v_cur, il);
    }
}

logquant_overlay * logquant_overlay_of(const llama_kv_cache_context * mctx) {
    return mctx != nullptr ? mctx->kv->lq_overlay.get() : nullptr;
}

ggml_tensor * logquant_build_attn(ggml_context * ctx, llm_graph_result * res, const llama_kv_cache_context * mctx, ggml_tensor * q,
                                  ggml_tensor * k_cur, ggml_tensor * v_cur, ggml_tensor * k, ggml_tensor * v,
                                  ggml_tensor * kq_mask, ggml_tensor * kq_b, ggml_tensor * sinks, ggml_tensor * v_mla,
                                  float kq_scale, const llama_hparams & hparams, int il) {
    // logquant_overlay_enable refuses models that would need these
    GGML_ASSERT(kq_b == nullptr && sinks == nullptr && v_mla == nullptr);
    return logquant_overlay_of(mctx)->build_attn(ctx, res, q, k_cur, v_cur, k, v, kq_mask, kq_scale, hparams, il);
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
    return logquant_overlay_enable_flags(ctx, n_slots, 0);
}

int32_t logquant_overlay_enable_flags(struct llama_context * ctx, uint32_t n_slots, uint32_t flags) {
    if ((flags & ~(LOGQUANT_CENTER_K | LOGQUANT_CENTER_V | LOGQUANT_KEYS_BY_CHANNEL)) != 0) {
        return fail(LOGQUANT_ERR_ARGUMENT, "unknown overlay flags");
    }
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
            kv->lq_overlay = std::make_shared<logquant_overlay>(*kv, n_slots, flags, ctx);
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
    return logquant_seq_set_full_precision_in(ctx, seq, pos, n, LOGQUANT_LAYERS_ALL);
}

int32_t logquant_seq_set_full_precision_in(struct llama_context * ctx, llama_seq_id seq, const llama_pos * pos, size_t n,
                                           uint32_t layers) {
    if (!seq_ok(ctx, seq) || (pos == nullptr && n > 0) || (layers & ~LOGQUANT_LAYERS_ALL) != 0) {
        return fail(LOGQUANT_ERR_ARGUMENT, "invalid context, sequence id, position list or layer selection");
    }
    if (!std::is_sorted(pos, pos + n)) {
        return fail(LOGQUANT_ERR_ARGUMENT, "positions must be sorted ascending");
    }
    const auto caches = caches_of(ctx);
    bool any = false;
    for (size_t i = 0; i < caches.size(); ++i) {
        auto * kv = caches[i];
        // caches_of lists the global (or only) cache first, the sliding-window one second
        any = any || kv->lq_overlay != nullptr;
        if (kv->lq_overlay && (layers & (i == 0 ? LOGQUANT_LAYERS_GLOBAL : LOGQUANT_LAYERS_SWA)) != 0) {
            kv->lq_overlay->set_full_precision(seq, pos, n);
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

int64_t logquant_seq_read_key(struct llama_context * ctx, llama_seq_id seq, int32_t il, llama_pos pos, bool from_store,
                              float * out, size_t n) {
    if (!seq_ok(ctx, seq) || out == nullptr) {
        return fail(LOGQUANT_ERR_ARGUMENT, "invalid context, sequence id or output buffer");
    }
    const auto caches = caches_of(ctx);
    if (caches.empty() || !caches[0]->lq_overlay) {
        return fail(LOGQUANT_ERR_STATE, "the overlay is not enabled on this context");
    }
    std::vector<float> key;
    if (!caches[0]->lq_overlay->read_key(seq, il, pos, from_store, key)) {
        return fail(LOGQUANT_ERR_ARGUMENT, "no such layer of this cache, token, or f16 copy of it");
    }
    if (n < key.size()) {
        return fail(LOGQUANT_ERR_ARGUMENT, "the output holds fewer values than a key row");
    }
    std::copy(key.begin(), key.end(), out);
    return int64_t(key.size());
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

static bool attn_case(const struct logquant_attn_case * c, const char * backend_name, int32_t reps, double * ms);

bool logquant_attn_run(const struct logquant_attn_case * c) {
    return logquant_attn_run_on(c, "CPU");
}

// A backend by name, with the CPU's thread count set; nullptr (and the error) if none.
static ggml_backend_t backend_by_name(const char * name, int n_threads) {
    ggml_backend_t backend = name != nullptr ? ggml_backend_init_by_name(name, nullptr) : nullptr;
    if (backend == nullptr) {
        fail(LOGQUANT_ERR_ARGUMENT, std::string("no ggml backend named ") + (name ? name : "(null)") +
                                        " in this build (the CUDA ones need --features cuda and a GPU)");
        return nullptr;
    }
    if (ggml_backend_is_cpu(backend)) {
        ggml_backend_cpu_set_n_threads(backend, n_threads);
    }
    return backend;
}

// Allocates ctx's tensors on backend (into buf), uploads, runs gf there; false (and
// the error) when the backend cannot run `out` or memory runs out.
static bool compute_on(ggml_backend_t backend, ggml_context * ctx, ggml_cgraph * gf, ggml_tensor * out,
                       ggml_backend_buffer_ptr & buf, const std::function<void()> & upload, int32_t reps = 0,
                       double * ms = nullptr) {
    if (!ggml_backend_supports_op(backend, out)) {
        fail(LOGQUANT_ERR_UNSUPPORTED, std::string(ggml_backend_name(backend)) + " cannot run " + ggml_op_desc(out) + " for this case");
        return false;
    }
    buf.reset(ggml_backend_alloc_ctx_tensors(ctx, backend));
    if (!buf) {
        fail(LOGQUANT_ERR_MEMORY, "out of memory on " + std::string(ggml_backend_name(backend)));
        return false;
    }
    upload();
    if (ggml_backend_graph_compute(backend, gf) != GGML_STATUS_SUCCESS) {
        fail(LOGQUANT_ERR_STATE, "graph compute failed on " + std::string(ggml_backend_name(backend)));
        return false;
    }
    ggml_backend_synchronize(backend);
    if (reps > 0 && ms != nullptr) {
        const int64_t t0 = ggml_time_us();
        for (int32_t r = 0; r < reps; ++r) {
            ggml_backend_graph_compute_async(backend, gf);
        }
        ggml_backend_synchronize(backend);
        *ms = double(ggml_time_us() - t0) / 1e3 / reps;
    }
    return true;
}

bool logquant_attn_run_on(const struct logquant_attn_case * c, const char * backend_name) {
    return attn_case(c, backend_name, 0, nullptr);
}

double logquant_attn_time_on(const struct logquant_attn_case * c, const char * backend_name, int32_t reps) {
    double ms = 0.0;
    return reps > 0 && attn_case(c, backend_name, reps, &ms) ? ms : -1.0;
}

static bool attn_case(const struct logquant_attn_case * c, const char * backend_name, int32_t reps, double * ms) {
    if (c == nullptr || c->q == nullptr || c->k_store == nullptr || c->v_store == nullptr || c->mask == nullptr ||
        c->out == nullptr || c->slot_to_cell == nullptr && c->n_slots > 0) {
        fail(LOGQUANT_ERR_ARGUMENT, "NULL pointer in the case");
        return false;
    }
    const int64_t D = c->head_dim;
    if (D <= 0 || D % ggml_blck_size(GGML_TYPE_LQ2) != 0 || D > 1024 || c->n_head <= 0 || c->n_head_kv <= 0 ||
        c->n_head % c->n_head_kv != 0 || c->n_tokens <= 0 || c->n_kv <= 0 || c->n_slots < 0 || c->n_threads <= 0 ||
        (c->n_slots > 0 && (c->k_overlay == nullptr || c->v_overlay == nullptr)) ||
        (c->k_by_channel != nullptr && c->n_kv % QK_LQ2 != 0) || (c->k_type != GGML_TYPE_LQ2 && c->k_type != GGML_TYPE_LQ3)) {
        fail(LOGQUANT_ERR_ARGUMENT, "inconsistent sizes or K type in the case");
        return false;
    }
    std::vector<int32_t> cell_to_slot(c->n_kv, -1);
    for (int32_t s = 0; s < c->n_slots; ++s) {
        const int32_t cell = c->slot_to_cell[s];
        if (cell < -1 || cell >= c->n_kv || (cell >= 0 && cell_to_slot[cell] >= 0)) {
            fail(LOGQUANT_ERR_ARGUMENT, "slot_to_cell names a cell twice or out of range");
            return false;
        }
        if (cell >= 0) {
            cell_to_slot[cell] = s;
        }
    }
    const int64_t rows = std::max<int64_t>(c->n_slots, 1);
    // keep test cases to a sane size
    if (int64_t(c->n_kv) * c->n_head_kv * D > (int64_t(1) << 28) || int64_t(c->n_tokens) * c->n_head * D > (int64_t(1) << 26) ||
        int64_t(c->n_kv) * c->n_tokens > (int64_t(1) << 26) || rows * c->n_head_kv * D > (int64_t(1) << 26)) {
        fail(LOGQUANT_ERR_ARGUMENT, "case too large");
        return false;
    }
    ggml_backend_t backend = backend_by_name(backend_name, c->n_threads);
    if (backend == nullptr) {
        return false;
    }
    ggml_init_params params = { 64*ggml_tensor_overhead() + ggml_graph_overhead(), nullptr, true };
    ggml_context * ctx = ggml_init(params);
    logquant_attn_state state = {};
    state.n_slots      = c->n_slots;
    state.n_cells      = c->n_kv;
    state.slot_to_cell = c->slot_to_cell;
    state.cell_to_slot = cell_to_slot.data();
    state.n_tokens     = c->n_tokens;
    state.k_by_channel = c->k_by_channel;
    logquant_attn_layer layer = { &state, c->scale, 0.0f, 0.0f };

    const attn_op op = new_attn_op(ctx, D, c->n_head, c->n_head_kv, c->n_tokens, c->n_kv, rows, &layer, c->k_by_channel != nullptr,
                                   ggml_type(c->k_type));
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, op.out);

    ggml_backend_buffer_ptr buf;
    const bool ok = compute_on(backend, ctx, gf, op.out, buf, [&] {
        ggml_backend_tensor_set(op.q, c->q, 0, ggml_nbytes(op.q));
        ggml_backend_tensor_set(op.k, c->k_store, 0, ggml_nbytes(op.k));
        ggml_backend_tensor_set(op.v, c->v_store, 0, ggml_nbytes(op.v));
        std::vector<ggml_fp16_t> mh(size_t(c->n_kv)*c->n_tokens);
        ggml_fp32_to_fp16_row(c->mask, mh.data(), int64_t(mh.size()));
        ggml_backend_tensor_set(op.mask, mh.data(), 0, ggml_nbytes(op.mask));
        std::vector<uint8_t> zero(ggml_nbytes(op.k_ov), 0);
        ggml_backend_tensor_set(op.k_ov, c->n_slots > 0 ? (const void *) c->k_overlay : zero.data(), 0, ggml_nbytes(op.k_ov));
        ggml_backend_tensor_set(op.v_ov, c->n_slots > 0 ? (const void *) c->v_overlay : zero.data(), 0, ggml_nbytes(op.v_ov));
        std::vector<int32_t> s2c_data(rows, -1);
        std::copy_n(c->slot_to_cell, c->n_slots, s2c_data.begin());
        ggml_backend_tensor_set(op.s2c, s2c_data.data(), 0, ggml_nbytes(op.s2c));
        if (op.kbc != nullptr) {
            std::vector<int32_t> flags(c->k_by_channel, c->k_by_channel + c->n_kv/QK_LQ2);
            ggml_backend_tensor_set(op.kbc, flags.data(), 0, ggml_nbytes(op.kbc));
        }
    }, reps, ms);
    if (ok) {
        ggml_backend_tensor_get(op.out, c->out, 0, ggml_nbytes(op.out));
    }
    buf.reset();
    ggml_free(ctx);
    ggml_backend_free(backend);
    return ok;
}

bool logquant_lq_set_rows_run(int32_t type, const float * src, int64_t n_rows, int64_t n_per_row, void * dst,
                              const char * backend_name) {
    if (src == nullptr || dst == nullptr || n_rows <= 0 || n_per_row <= 0 || n_per_row % QK_LQ2 != 0 ||
        n_rows * n_per_row > (int64_t(1) << 26) || (type != GGML_TYPE_LQ2 && type != GGML_TYPE_LQ3)) {
        fail(LOGQUANT_ERR_ARGUMENT, "invalid rows or type for lq2/lq3 quantization");
        return false;
    }
    ggml_backend_t backend = backend_by_name(backend_name, 1);
    if (backend == nullptr) {
        return false;
    }
    ggml_init_params params = { 16*ggml_tensor_overhead() + ggml_graph_overhead(), nullptr, true };
    ggml_context * ctx = ggml_init(params);
    ggml_tensor * x   = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_per_row, n_rows);
    ggml_tensor * y   = ggml_new_tensor_2d(ctx, ggml_type(type), n_per_row, n_rows);
    ggml_tensor * idx = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, n_rows);
    ggml_tensor * out = ggml_set_rows(ctx, y, x, idx);
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);
    ggml_backend_buffer_ptr buf;
    const bool ok = compute_on(backend, ctx, gf, out, buf, [&] {
        ggml_backend_tensor_set(x, src, 0, ggml_nbytes(x));
        std::vector<int64_t> rows(n_rows);
        for (int64_t i = 0; i < n_rows; ++i) {
            rows[i] = i;
        }
        ggml_backend_tensor_set(idx, rows.data(), 0, ggml_nbytes(idx));
        std::vector<uint8_t> zero(ggml_nbytes(y), 0);
        ggml_backend_tensor_set(y, zero.data(), 0, ggml_nbytes(y));
    });
    if (ok) {
        ggml_backend_tensor_get(y, dst, 0, ggml_nbytes(y));
    }
    buf.reset();
    ggml_free(ctx);
    ggml_backend_free(backend);
    return ok;
}
