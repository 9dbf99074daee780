// oneDNN 2-D convolutions (NHWC input, HWIO kernel, f32) as XLA:CPU FFI custom calls.
//
// Built and loaded by fedjax_sim/models/onednn.py (g++ against jaxlib's FFI headers and the
// oneDNN of the `onednn-cpu-gomp` / `onednn-devel-cpu-gomp` wheels). Three handlers: the forward
// convolution, its input gradient (backward data) and its weight gradient (backward weights).
// Activations stay in their NHWC layout (no reorder of the large tensors); the kernel is
// reordered between HWIO and the layout oneDNN's primitive asks for (a few KB).
//
// Primitives are created once per geometry and cached. Every call brings its own scratchpad
// (scratchpad_mode::user) from a buffer of its thread, so two XLA devices may run the same
// primitive at once.

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;
using Dt = memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// N, H, W, C (input); KH, KW, O (kernel); OH, OW (output); strides; padding low / high.
using Geometry = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                            int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                            int64_t>;

struct Descs {
  memory::desc src, weights_any, weights_user, dst;
  memory::dims strides, pad_lo, pad_hi;
};

Descs MakeDescs(const Geometry& g) {
  auto [n, h, w, c, kh, kw, o, oh, ow, sh, sw, ph0, pw0, ph1, pw1] = g;
  return Descs{memory::desc({n, c, h, w}, Dt::f32, Tag::nhwc),
               memory::desc({o, c, kh, kw}, Dt::f32, Tag::any),
               memory::desc({o, c, kh, kw}, Dt::f32, Tag::hwio),
               memory::desc({n, o, oh, ow}, Dt::f32, Tag::nhwc),
               {sh, sw},
               {ph0, pw0},
               {ph1, pw1}};
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Descs& d) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, d.src,
      d.weights_any, d.dst, d.strides, d.pad_lo, d.pad_hi, UserScratchpad());
}

// A primitive and its descriptor, made once per geometry (the cache is guarded; executing a
// primitive from several threads at once is allowed with user scratchpads).
template <typename P>
struct Primitive {
  typename P::primitive_desc pd;
  P prim;
};

template <typename P>
typename P::primitive_desc Describe(const Descs& d) {
  if constexpr (std::is_same_v<P, dnnl::convolution_forward>) {
    return ForwardDesc(d);
  } else {  // backward data or weights: the same argument order, the forward as hint
    return typename P::primitive_desc(Engine(), dnnl::algorithm::convolution_direct, d.src,
                                      d.weights_any, d.dst, d.strides, d.pad_lo, d.pad_hi,
                                      ForwardDesc(d), UserScratchpad());
  }
}

template <typename P>
const Primitive<P>& Get(const Geometry& g) {
  static std::mutex mutex;
  static std::map<Geometry, std::unique_ptr<Primitive<P>>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(g);
  if (it == cache.end()) {
    typename P::primitive_desc pd = Describe<P>(MakeDescs(g));
    it = cache.emplace(g, std::make_unique<Primitive<P>>(Primitive<P>{pd, P(pd)})).first;
  }
  return *it->second;
}

Geometry MakeGeometry(ffi::Span<const int64_t> input, ffi::Span<const int64_t> kernel,
                      ffi::Span<const int64_t> output, int64_t sh, int64_t sw, int64_t ph0,
                      int64_t pw0, int64_t ph1, int64_t pw1) {
  return Geometry{input[0], input[1], input[2], input[3], kernel[0], kernel[1], kernel[3],
                  output[1], output[2], sh, sw, ph0, pw0, ph1, pw1};
}

// A buffer of `desc`'s size from this thread's slot `slot` (kept between calls and grown when
// needed: no allocation or page faults per call; concurrent calls run on different threads).
struct Scratch {
  memory mem;
  Scratch(const memory::desc& desc, int slot)
      : mem(desc, Engine(), Buffer(slot, desc.get_size())) {}
  static void* Buffer(int slot, size_t size) {
    thread_local std::vector<char> buffers[3];
    std::vector<char>& bytes = buffers[slot];
    if (bytes.size() < size + 64) bytes.resize(size + 64);
    return reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(bytes.data()) + 63) &
                                   ~uintptr_t{63});
  }
};

// The kernel in the layout `wanted`: the user's HWIO memory itself, or a reordered copy.
memory KernelAs(const memory::desc& wanted, memory& user, dnnl::stream& stream,
                std::unique_ptr<Scratch>& holder) {
  if (wanted == user.get_desc()) return user;
  holder = std::make_unique<Scratch>(wanted, 1);
  dnnl::reorder(user, holder->mem).execute(stream, user, holder->mem);
  return holder->mem;
}

template <typename F>
ffi::Error Guarded(F body) {
  try {
    body();
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN convolution: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("oneDNN convolution: ") + e.what());
  }
}

// Runs `p` (forward or backward data: the kernel is one of its inputs) from `input` to `output`,
// given the kernel in HWIO at `kernel`.
template <typename Primitive>
void RunWithKernel(const Primitive& p, const Descs& d, const memory::desc& input_md,
                   int input_arg, void* input, const memory::desc& output_md, int output_arg,
                   void* output, void* kernel) {
  dnnl::stream stream(Engine());
  memory in(input_md, Engine(), input);
  memory out(output_md, Engine(), output);
  memory user_weights(d.weights_user, Engine(), kernel);
  std::unique_ptr<Scratch> reordered;
  memory weights = KernelAs(p.pd.weights_desc(), user_weights, stream, reordered);
  Scratch scratch(p.pd.scratchpad_desc(), 0);
  p.prim.execute(stream, {{input_arg, in},
                          {DNNL_ARG_WEIGHTS, weights},
                          {output_arg, out},
                          {DNNL_ARG_SCRATCHPAD, scratch.mem}});
  stream.wait();
}

ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t ph0,
                       int64_t pw0, int64_t ph1, int64_t pw1) {
  return Guarded([&] {
    Geometry g = MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, ph0, pw0,
                              ph1, pw1);
    Descs d = MakeDescs(g);
    RunWithKernel(Get<dnnl::convolution_forward>(g), d, d.src, DNNL_ARG_SRC, x.untyped_data(), d.dst, DNNL_ARG_DST,
                  y->untyped_data(), w.untyped_data());
  });
}

ffi::Error BackwardDataImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                            ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t ph0,
                            int64_t pw0, int64_t ph1, int64_t pw1) {
  return Guarded([&] {
    Geometry g = MakeGeometry(dx->dimensions(), w.dimensions(), dy.dimensions(), sh, sw, ph0,
                              pw0, ph1, pw1);
    Descs d = MakeDescs(g);
    RunWithKernel(Get<dnnl::convolution_backward_data>(g), d, d.dst, DNNL_ARG_DIFF_DST, dy.untyped_data(), d.src,
                  DNNL_ARG_DIFF_SRC, dx->untyped_data(), w.untyped_data());
  });
}

ffi::Error BackwardWeightsImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                               ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw,
                               int64_t ph0, int64_t pw0, int64_t ph1, int64_t pw1) {
  return Guarded([&] {
    Geometry g = MakeGeometry(x.dimensions(), dw->dimensions(), dy.dimensions(), sh, sw, ph0,
                              pw0, ph1, pw1);
    Descs d = MakeDescs(g);
    const auto& b = Get<dnnl::convolution_backward_weights>(g);
    dnnl::stream stream(Engine());
    memory src(d.src, Engine(), x.untyped_data());
    memory diff_dst(d.dst, Engine(), dy.untyped_data());
    memory user_weights(d.weights_user, Engine(), dw->untyped_data());
    Scratch scratch(b.pd.scratchpad_desc(), 0);
    const memory::desc& wanted = b.pd.diff_weights_desc();
    if (wanted == user_weights.get_desc()) {
      b.prim.execute(stream, {{DNNL_ARG_SRC, src},
                              {DNNL_ARG_DIFF_DST, diff_dst},
                              {DNNL_ARG_DIFF_WEIGHTS, user_weights},
                              {DNNL_ARG_SCRATCHPAD, scratch.mem}});
    } else {
      Scratch blocked(wanted, 2);
      b.prim.execute(stream, {{DNNL_ARG_SRC, src},
                              {DNNL_ARG_DIFF_DST, diff_dst},
                              {DNNL_ARG_DIFF_WEIGHTS, blocked.mem},
                              {DNNL_ARG_SCRATCHPAD, scratch.mem}});
      dnnl::reorder(blocked.mem, user_weights).execute(stream, blocked.mem, user_weights);
    }
    stream.wait();
  });
}

}  // namespace

#define FEDJAX_CONV_ATTRS                                                              \
  .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("ph0").Attr<int64_t>("pw0") \
      .Attr<int64_t>("ph1")                                                            \
      .Attr<int64_t>("pw1")

XLA_FFI_DEFINE_HANDLER_SYMBOL(FedjaxOnednnConvForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() FEDJAX_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(FedjaxOnednnConvBackwardData, BackwardDataImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() FEDJAX_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(FedjaxOnednnConvBackwardWeights, BackwardWeightsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() FEDJAX_CONV_ATTRS);
