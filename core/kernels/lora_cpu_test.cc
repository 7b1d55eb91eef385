// Tests of the CPU functors of lora.h against a naive double-precision
// reference, with no OpKernel in the way. The target lora_cpu_baseline_test
// runs them again with TF_LORA_CPU_ISA=baseline: the code for CPUs without
// AVX2.

#define EIGEN_USE_THREADS

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "core/kernels/lora.h"
#include "gtest/gtest.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace tf_lora {
namespace {

// 64-byte aligned, as TensorFlow's allocator hands out buffers.
template <typename T>
using Buffer = std::vector<T, Eigen::aligned_allocator<T>>;

template <typename T>
Buffer<T> Random(int64_t n, std::mt19937* rng) {
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  Buffer<T> v(n);
  for (auto& x : v) x = static_cast<T>(dist(*rng));
  return v;
}

template <typename T>
void CheckMerge(const Eigen::ThreadPoolDevice& d, const char* type, int64_t in,
                int64_t out, int64_t r, bool in_place, double tol) {
  std::mt19937 rng(in * 1000003 + out * 101 + r);
  Buffer<T> w = Random<T>(in * out, &rng), a = Random<T>(in * r, &rng),
            b = Random<T>(r * out, &rng);
  const T scale = static_cast<T>(0.75f);
  const Buffer<T> w0 = w;
  Buffer<T> merged(in * out, static_cast<T>(-7.f));
  T* result = in_place ? w.data() : merged.data();
  functor::LoraMerge<Eigen::ThreadPoolDevice, T>()(
      d, in, out, r, w.data(), a.data(), b.data(), scale, result);
  double max_err = 0;
  for (int64_t i = 0; i < in; ++i) {
    for (int64_t j = 0; j < out; ++j) {
      double ref = static_cast<double>(w0[i * out + j]);
      for (int64_t k = 0; k < r; ++k) {
        ref += static_cast<double>(scale) * static_cast<double>(a[i * r + k]) *
               static_cast<double>(b[k * out + j]);
      }
      // Relative to the value: the output's own rounding dominates for half
      // types.
      const double err =
          std::abs(static_cast<double>(result[i * out + j]) - ref) /
          (1 + std::abs(ref));
      if (!(err <= max_err)) max_err = err;  // NaN propagates into max_err.
    }
  }
  EXPECT_LE(max_err, tol) << "LoraMerge<" << type << "> in=" << in
                          << " out=" << out << " r=" << r
                          << (in_place ? " in-place" : "");
}

template <typename T>
void CheckAllShapes(const Eigen::ThreadPoolDevice& d, const char* type,
                    double tol) {
  // Covers full 4-row blocks and the short last block, full column tiles and
  // the column tail, r = 0 (plain copy), and shapes big enough to be split
  // across threads. The last four write at least 8 MiB out of place for some
  // types, through the non-temporal stores: with a column tail (2056 floats,
  // 2052 doubles) and without.
  const int64_t shapes[][3] = {
      {1, 1, 1},       {3, 5, 2},       {4, 16, 1},      {7, 33, 3},
      {64, 64, 8},     {130, 70, 16},   {257, 300, 4},   {9, 40, 0},
      {0, 8, 2},       {8, 0, 2},       {513, 129, 33},  {1025, 2048, 16},
      {2049, 2056, 5}, {2050, 2052, 3}, {2051, 2064, 16}};
  for (const auto& s : shapes) {
    CheckMerge<T>(d, type, s[0], s[1], s[2], /*in_place=*/false, tol);
    CheckMerge<T>(d, type, s[0], s[1], s[2], /*in_place=*/true, tol);
  }
}

template <typename T>
void CheckApply(const Eigen::ThreadPoolDevice& d, const char* type, int64_t n,
                int64_t in, int64_t out, int64_t r, bool in_place, double tol) {
  std::mt19937 rng(n * 7919 + in * 1000003 + out * 101 + r);
  Buffer<T> y = Random<T>(n * out, &rng), x = Random<T>(n * in, &rng),
            a = Random<T>(in * r, &rng), b = Random<T>(r * out, &rng);
  const T scale = static_cast<T>(-1.25f);
  const Buffer<T> y0 = y;
  Buffer<T> y_out(n * out, static_cast<T>(-7.f));
  Buffer<T> xa_out(n * r, static_cast<T>(-7.f));  // the second output
  T* result = in_place ? y.data() : y_out.data();
  functor::LoraApply<Eigen::ThreadPoolDevice, T>()(
      d, n, in, out, r, y.data(), x.data(), a.data(), b.data(), scale, result,
      xa_out.data());
  double max_err = 0;
  std::vector<double> xa(r);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t k = 0; k < r; ++k) {
      xa[k] = 0;
      for (int64_t c = 0; c < in; ++c) {
        xa[k] += static_cast<double>(x[i * in + c]) *
                 static_cast<double>(a[c * r + k]);
      }
      const double err =
          std::abs(static_cast<double>(xa_out[i * r + k]) - xa[k]) /
          (1 + std::abs(xa[k]) + 0.05 * std::sqrt(double(in)));
      if (!(err <= max_err)) max_err = err;
    }
    for (int64_t j = 0; j < out; ++j) {
      double ref = static_cast<double>(y0[i * out + j]);
      for (int64_t k = 0; k < r; ++k) {
        ref += static_cast<double>(scale) * xa[k] *
               static_cast<double>(b[k * out + j]);
      }
      // Relative to the size of the terms summed (in * r products).
      const double err =
          std::abs(static_cast<double>(result[i * out + j]) - ref) /
          (1 + std::abs(ref) + 0.05 * std::sqrt(double(in * r)));
      if (!(err <= max_err)) max_err = err;
    }
  }
  EXPECT_LE(max_err, tol) << "LoraApply<" << type << "> n=" << n << " in=" << in
                          << " out=" << out << " r=" << r
                          << (in_place ? " in-place" : "");
}

template <typename T>
void CheckApplyShapes(const Eigen::ThreadPoolDevice& d, const char* type,
                      double tol) {
  // (n, in, out, r): row and column tails, r above one tile (17, 40), r = 0,
  // in = 0, n = 0, out = 0, and a decode-sized single row.
  const int64_t shapes[][4] = {
      {1, 1, 1, 1},
      {3, 5, 7, 2},
      {4, 16, 16, 16},
      {9, 33, 70, 17},
      {130, 64, 96, 40},
      {1, 300, 257, 8},
      {6, 10, 12, 0},
      {6, 0, 12, 3},
      {0, 10, 12, 3},
      {6, 10, 0, 3},
      {67, 129, 131, 16},
      {2053, 8, 2056, 4}};  // 16 MiB of float y_out: streamed
  for (const auto& s : shapes) {
    for (bool in_place : {false, true}) {
      CheckApply<T>(d, type, s[0], s[1], s[2], s[3], in_place, tol);
    }
  }
}

// saved: with LoraApply's x @ a and a gradient for it (grad_xa). The given
// x @ a is off by 0.5: float and double must use it (db and dscale show the
// offset), half types must compute x @ a again, in float32.
template <typename T>
void CheckApplyGrad(const Eigen::ThreadPoolDevice& d, const char* type,
                    int64_t n, int64_t in, int64_t out, int64_t r, bool saved,
                    double tol) {
  std::mt19937 rng(n * 31 + in * 1009 + out * 17 + r);
  Buffer<T> g = Random<T>(n * out, &rng), x = Random<T>(n * in, &rng),
            a = Random<T>(in * r, &rng), b = Random<T>(r * out, &rng),
            grad_xa = Random<T>(n * r, &rng);
  const double s = 0.75;
  const auto at = [](const Buffer<T>& m, int64_t i) {
    return static_cast<double>(m[i]);
  };
  // Double references of the [n, r] factors, then of each gradient.
  std::vector<double> xa(n * r, 0), gbt(n * r, 0), u(n * r);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t k = 0; k < r; ++k) {
      for (int64_t c = 0; c < in; ++c)
        xa[i * r + k] += at(x, i * in + c) * at(a, c * r + k);
      for (int64_t j = 0; j < out; ++j)
        gbt[i * r + k] += at(g, i * out + j) * at(b, k * out + j);
    }
  }
  Buffer<T> given_xa(n * r);
  for (int64_t e = 0; e < n * r; ++e) {
    given_xa[e] = static_cast<T>(xa[e] + (in > 0 ? 0.5 : 0.0));
    u[e] = s * gbt[e] + (saved ? at(grad_xa, e) : 0.0);
  }
  if (saved && (std::is_same_v<T, float> || std::is_same_v<T, double>)) {
    for (int64_t e = 0; e < n * r; ++e) xa[e] = at(given_xa, e);
  }
  Buffer<T> dx(n * in, static_cast<T>(-7.f)), da(in * r), db(r * out);
  T dscale;
  functor::LoraApplyGrad<Eigen::ThreadPoolDevice, T>()(
      d, n, in, out, r, g.data(), x.data(), a.data(), b.data(),
      static_cast<T>(s), dx.data(), da.data(), db.data(), &dscale,
      saved ? given_xa.data() : nullptr, saved ? grad_xa.data() : nullptr);
  double err = 0, ref_dscale = 0;
  const auto check = [&](double got, double ref, double terms) {
    const double e =
        std::abs(got - ref) / (1 + std::abs(ref) + 0.05 * std::sqrt(terms));
    if (!(e <= err)) err = e;
  };
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < in; ++c) {
      double ref = 0;
      for (int64_t k = 0; k < r; ++k) ref += u[i * r + k] * at(a, c * r + k);
      check(at(dx, i * in + c), ref, double(out) * r);
    }
    for (int64_t k = 0; k < r; ++k)
      ref_dscale += xa[i * r + k] * gbt[i * r + k];
  }
  for (int64_t c = 0; c < in; ++c) {
    for (int64_t k = 0; k < r; ++k) {
      double ref = 0;
      for (int64_t i = 0; i < n; ++i) ref += at(x, i * in + c) * u[i * r + k];
      check(at(da, c * r + k), ref, double(n) * out);
    }
  }
  for (int64_t k = 0; k < r; ++k) {
    for (int64_t j = 0; j < out; ++j) {
      double ref = 0;
      for (int64_t i = 0; i < n; ++i)
        ref += s * xa[i * r + k] * at(g, i * out + j);
      check(at(db, k * out + j), ref, double(n) * in);
    }
  }
  check(static_cast<double>(dscale), ref_dscale, double(n) * r * (in + out));
  EXPECT_LE(err, tol) << "LoraApplyGrad<" << type << "> n=" << n << " in=" << in
                      << " out=" << out << " r=" << r
                      << (saved ? " with xa, grad_xa" : "");
}

template <typename T>
void CheckApplyGradShapes(const Eigen::ThreadPoolDevice& d, const char* type,
                          double tol) {
  // (n, in, out, r): tails of every blocking (8- and 16-row register tiles,
  // 32-row blocks, panels of x's columns, passes of 16, 8, 4 and 1 values of
  // k in da and db, column tiles), several shards, r over one tile, empties.
  const int64_t shapes[][4] = {
      {1, 1, 1, 1},      {3, 5, 7, 2},
      {5, 17, 33, 3},    {70, 24, 40, 16},
      {9, 33, 70, 17},   {300, 19, 21, 5},
      {37, 300, 50, 13}, {45, 260, 129, 40},
      {33, 128, 64, 16}, {0, 8, 8, 2},
      {6, 10, 12, 0},    {6, 0, 12, 3},
      {6, 10, 0, 3},     {2100, 8, 12, 4},
      {2053, 2056, 8, 4}};  // 16 MiB of float dx: streamed
  for (const auto& s : shapes) {
    for (bool saved : {false, true}) {
      CheckApplyGrad<T>(d, type, s[0], s[1], s[2], s[3], saved, tol);
    }
  }
}

// BatchedLoraApply must equal a loop of single-row LoraApply calls, and its
// gradient the per-adapter LoraApplyGrad of the gathered rows: bit for bit,
// since each element goes through the same arithmetic in the same order.
template <typename T>
void CheckBatched(const Eigen::ThreadPoolDevice& d, const char* type, int64_t n,
                  int64_t in, int64_t out, int64_t r, int64_t adapters,
                  bool in_place) {
  std::mt19937 rng(n * 13 + in * 7 + out * 3 + r + adapters);
  Buffer<T> y = Random<T>(n * out, &rng), x = Random<T>(n * in, &rng),
            a = Random<T>(adapters * in * r, &rng),
            b = Random<T>(adapters * r * out, &rng),
            scales = Random<T>(adapters, &rng), g = Random<T>(n * out, &rng);
  std::vector<int32_t> ids(n);
  // Adapter `adapters - 1` gets no rows when there are several adapters.
  const int64_t used = adapters > 1 ? adapters - 1 : adapters;
  for (auto& id : ids) id = static_cast<int32_t>(rng() % (used + 1)) - 1;
  const Buffer<T> y0 = y;
  Buffer<T> y_out(n * out, static_cast<T>(-7.f));
  Buffer<T> xa(n * r, static_cast<T>(-7.f));  // the second output
  T* result = in_place ? y.data() : y_out.data();
  functor::BatchedLoraApply<Eigen::ThreadPoolDevice, T>()(
      d, n, in, out, r, adapters, y.data(), x.data(), a.data(), b.data(),
      ids.data(), scales.data(), result, xa.data());
  bool ok = true;
  Buffer<T> row(out), row_xa(r, T(0));
  for (int64_t i = 0; i < n; ++i) {
    std::copy_n(y0.data() + i * out, out, row.data());
    std::fill(row_xa.begin(), row_xa.end(), T(0));
    if (ids[i] >= 0) {
      const int64_t k = ids[i];
      functor::LoraApply<Eigen::ThreadPoolDevice, T>()(
          d, 1, in, out, r, row.data(), x.data() + i * in,
          a.data() + k * in * r, b.data() + k * r * out, scales[k], row.data(),
          row_xa.data());
    }
    ok &= std::equal(row.begin(), row.end(), result + i * out);
    ok &= std::equal(row_xa.begin(), row_xa.end(), xa.begin() + i * r);
  }
  // Gradients: without, and with the forward's x @ a (off by 0.5, so that
  // using it shows) and a gradient for it.
  Buffer<T> given(n * r), grad_xa = Random<T>(n * r, &rng);
  for (int64_t e = 0; e < n * r; ++e) {
    given[e] = static_cast<T>(static_cast<float>(xa[e]) + 0.5f);
  }
  for (bool saved : {false, true}) {
    Buffer<T> dx(n * in, static_cast<T>(-7.f)), da(adapters * in * r),
        db(adapters * r * out), ds(adapters);
    functor::BatchedLoraApplyGrad<Eigen::ThreadPoolDevice, T>()(
        d, n, in, out, r, adapters, g.data(), x.data(), a.data(), b.data(),
        ids.data(), scales.data(), dx.data(), da.data(), db.data(), ds.data(),
        saved ? given.data() : nullptr, saved ? grad_xa.data() : nullptr);
    for (int64_t k = -1; k < adapters; ++k) {
      std::vector<int64_t> rows;
      for (int64_t i = 0; i < n; ++i) {
        if (ids[i] == k) rows.push_back(i);
      }
      if (k < 0) {
        for (int64_t i : rows) {
          ok &= std::all_of(dx.begin() + i * in, dx.begin() + (i + 1) * in,
                            [](T v) { return static_cast<float>(v) == 0.f; });
        }
        continue;
      }
      const int64_t m = rows.size();
      Buffer<T> gk(m * out), xk(m * in), dxk(m * in), dak(in * r), dbk(r * out),
          xak(m * r), gxak(m * r);
      T dsk;
      for (int64_t j = 0; j < m; ++j) {
        std::copy_n(g.data() + rows[j] * out, out, gk.data() + j * out);
        std::copy_n(x.data() + rows[j] * in, in, xk.data() + j * in);
        std::copy_n(given.data() + rows[j] * r, r, xak.data() + j * r);
        std::copy_n(grad_xa.data() + rows[j] * r, r, gxak.data() + j * r);
      }
      functor::LoraApplyGrad<Eigen::ThreadPoolDevice, T>()(
          d, m, in, out, r, gk.data(), xk.data(), a.data() + k * in * r,
          b.data() + k * r * out, scales[k], dxk.data(), dak.data(), dbk.data(),
          &dsk, saved ? xak.data() : nullptr, saved ? gxak.data() : nullptr);
      for (int64_t j = 0; j < m; ++j) {
        ok &= std::equal(dxk.begin() + j * in, dxk.begin() + (j + 1) * in,
                         dx.begin() + rows[j] * in);
      }
      ok &= std::equal(dak.begin(), dak.end(), da.begin() + k * in * r);
      ok &= std::equal(dbk.begin(), dbk.end(), db.begin() + k * r * out);
      ok &= static_cast<float>(dsk) == static_cast<float>(ds[k]);
    }
  }
  EXPECT_TRUE(ok) << "BatchedLoraApply<" << type << "> n=" << n << " in=" << in
                  << " out=" << out << " r=" << r << " adapters=" << adapters
                  << (in_place ? " in-place" : "")
                  << ": differs from per-row applies and per-adapter grads";
}

template <typename T>
void CheckBatchedShapes(const Eigen::ThreadPoolDevice& d, const char* type) {
  const int64_t shapes[][5] = {{1, 3, 5, 2, 1},
                               {13, 9, 17, 3, 4},
                               {70, 20, 33, 16, 3},
                               {300, 16, 24, 5, 8},
                               {0, 4, 4, 2, 2},
                               {9, 6, 7, 0, 2},
                               {9, 6, 0, 3, 2},  // out = 0: x @ a, grad_xa
                               {1100, 8, 16, 4, 2},
                               // ~66 rows an adapter: some side by side on
                               // one thread each, some over their shards
                               {2000, 24, 40, 8, 30},
                               // ~2000 rows x 2048 through the row map: the
                               // float and double outputs are streamed
                               {4100, 8, 2048, 4, 2}};
  for (const auto& s : shapes) {
    for (bool in_place : {false, true}) {
      CheckBatched<T>(d, type, s[0], s[1], s[2], s[3], s[4], in_place);
    }
  }
}

// Every output element is computed by the same code on the same inputs
// whatever the sharding, so results must not depend on the thread count.
TEST(LoraCpu, ResultsDoNotDependOnTheThreadCount) {
  std::mt19937 rng(11);
  const int64_t n = 203, in = 77, out = 301, r = 12;
  Buffer<float> y = Random<float>(n * out, &rng),
                x = Random<float>(n * in, &rng),
                a = Random<float>(in * r, &rng),
                b = Random<float>(r * out, &rng);
  Buffer<float> one(n * out), many(n * out), m1(in * out), m3(in * out);
  Buffer<float> w = Random<float>(in * out, &rng),
                aw = Random<float>(in * r, &rng);
  Eigen::ThreadPool pool1(1), pool3(3);
  Eigen::ThreadPoolDevice d1(&pool1, 1), d3(&pool3, 3);
  functor::LoraApply<Eigen::ThreadPoolDevice, float>()(
      d1, n, in, out, r, y.data(), x.data(), a.data(), b.data(), 0.5f,
      one.data());
  functor::LoraApply<Eigen::ThreadPoolDevice, float>()(
      d3, n, in, out, r, y.data(), x.data(), a.data(), b.data(), 0.5f,
      many.data());
  functor::LoraMerge<Eigen::ThreadPoolDevice, float>()(
      d1, in, out, r, w.data(), aw.data(), b.data(), 0.5f, m1.data());
  functor::LoraMerge<Eigen::ThreadPoolDevice, float>()(
      d3, in, out, r, w.data(), aw.data(), b.data(), 0.5f, m3.data());
  Buffer<float> g = Random<float>(n * out, &rng);
  Buffer<float> dx1(n * in), dx3(n * in), da1(in * r), da3(in * r),
      db1(r * out), db3(r * out);
  float ds1, ds3;
  functor::LoraApplyGrad<Eigen::ThreadPoolDevice, float>()(
      d1, n, in, out, r, g.data(), x.data(), a.data(), b.data(), 0.5f,
      dx1.data(), da1.data(), db1.data(), &ds1);
  functor::LoraApplyGrad<Eigen::ThreadPoolDevice, float>()(
      d3, n, in, out, r, g.data(), x.data(), a.data(), b.data(), 0.5f,
      dx3.data(), da3.data(), db3.data(), &ds3);
  EXPECT_EQ(one, many);
  EXPECT_EQ(m1, m3);
  EXPECT_EQ(dx1, dx3);
  EXPECT_EQ(da1, da3);
  EXPECT_EQ(db1, db3);
  EXPECT_EQ(ds1, ds3);
}

// Rounding to T must be bit-exact with static_cast<T> (Eigen's
// round-to-nearest-even, NaN kept), for the vector conversions as for the
// scalar ones. With r = 1, a = 1 and scale = 1 the float32 result is w + b
// computed once, so the reference is static_cast<T>(float(w) + float(b))
// exactly.
template <typename T>
void CheckRoundingMatchesEigen(const Eigen::ThreadPoolDevice& d,
                               const char* type) {
  std::mt19937 rng(7);
  const int64_t out = 1 << 16;
  Buffer<T> w(out), b(out), merged(out);
  const uint16_t specials[] = {0x0000, 0x8000, 0x0001, 0x8001, 0x7F80, 0xFF80,
                               0x7C00, 0xFC00, 0x7FC0, 0x7E00, 0x3F80, 0x3C00,
                               0x0080, 0x0400, 0x7F7F, 0x7BFF};
  for (int64_t j = 0; j < out; ++j) {
    uint16_t wb = j < 256 ? specials[j % 16] : static_cast<uint16_t>(rng());
    uint16_t bb = j < 256 ? specials[j / 16] : static_cast<uint16_t>(rng());
    std::memcpy(static_cast<void*>(&w[j]), &wb, 2);
    std::memcpy(static_cast<void*>(&b[j]), &bb, 2);
  }
  const T one = static_cast<T>(1.f);
  functor::LoraMerge<Eigen::ThreadPoolDevice, T>()(
      d, 1, out, 1, w.data(), &one, b.data(), one, merged.data());
  int64_t mismatches = 0;
  for (int64_t j = 0; j < out; ++j) {
    const T ref =
        static_cast<T>(static_cast<float>(w[j]) + static_cast<float>(b[j]));
    const bool ref_nan = std::isnan(static_cast<float>(ref));
    const bool got_nan = std::isnan(static_cast<float>(merged[j]));
    uint16_t rb, gb;
    std::memcpy(&rb, static_cast<const void*>(&ref), 2);
    std::memcpy(&gb, static_cast<const void*>(&merged[j]), 2);
    mismatches += ref_nan ? !got_nan : rb != gb;
  }
  EXPECT_EQ(mismatches, 0) << "rounding to " << type << " differs from "
                           << "static_cast on " << mismatches << " of " << out
                           << " values";
}

// Each target runs the code path its TF_LORA_CPU_ISA caps (none: the widest
// the CPU has), so the AVX-512, AVX2 and baseline code are all tested on a
// machine with AVX-512.
TEST(LoraCpu, RunsTheCodePathAsked) {
  const char* env = std::getenv("TF_LORA_CPU_ISA");
  const std::string cap = env != nullptr ? env : "avx512";
#if defined(__x86_64__)
  const bool avx2 = __builtin_cpu_supports("avx2") &&
                    __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq");
#else
  const bool avx2 = false, avx512 = false;
#endif
  std::string want = "baseline";
  if (cap == "avx512" && avx512) {
    want = "avx512";
  } else if (cap != "baseline" && avx2) {
    want = "avx2";
  }
  EXPECT_EQ(functor::CpuCodePath(), want);
}

// As TensorFlow's CPU device runs the functors: a pool of worker threads.
const Eigen::ThreadPoolDevice& Device() {
  static Eigen::ThreadPool* pool = new Eigen::ThreadPool(4);
  static Eigen::ThreadPoolDevice* device = new Eigen::ThreadPoolDevice(pool, 4);
  return *device;
}

// Half types: one rounding of the float32 result (2^-11 and 2^-8 relative),
// plus float32 sums.
TEST(LoraCpu, MergeMatchesTheReference) {
  CheckAllShapes<float>(Device(), "float", 1e-6);
  CheckAllShapes<double>(Device(), "double", 1e-14);
  CheckAllShapes<Eigen::half>(Device(), "half", 1e-3);
  CheckAllShapes<Eigen::bfloat16>(Device(), "bfloat16", 4e-3);
}

TEST(LoraCpu, ApplyMatchesTheReference) {
  CheckApplyShapes<float>(Device(), "float", 1e-5);
  CheckApplyShapes<double>(Device(), "double", 1e-14);
  CheckApplyShapes<Eigen::half>(Device(), "half", 1e-3);
  CheckApplyShapes<Eigen::bfloat16>(Device(), "bfloat16", 4e-3);
}

TEST(LoraCpu, ApplyGradMatchesTheReference) {
  CheckApplyGradShapes<float>(Device(), "float", 1e-5);
  CheckApplyGradShapes<double>(Device(), "double", 1e-13);
  CheckApplyGradShapes<Eigen::half>(Device(), "half", 2e-3);
  CheckApplyGradShapes<Eigen::bfloat16>(Device(), "bfloat16", 8e-3);
}

TEST(LoraCpu, BatchedEqualsPerAdapterCalls) {
  CheckBatchedShapes<float>(Device(), "float");
  CheckBatchedShapes<double>(Device(), "double");
  CheckBatchedShapes<Eigen::half>(Device(), "half");
  CheckBatchedShapes<Eigen::bfloat16>(Device(), "bfloat16");
}

TEST(LoraCpu, RoundingToHalfTypesMatchesStaticCast) {
  CheckRoundingMatchesEigen<Eigen::half>(Device(), "half");
  CheckRoundingMatchesEigen<Eigen::bfloat16>(Device(), "bfloat16");
}

}  // namespace
}  // namespace tf_lora
