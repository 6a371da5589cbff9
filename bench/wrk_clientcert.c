/* LD_PRELOAD shim for wrk: every TLS context it creates presents a client certificate.
 *
 * wrk has no option for a client certificate, and OpenSSL refuses certificates in the
 * configuration file's system_default section. This wraps SSL_CTX_new and loads
 * $BENCH_CLIENT_CERT (PEM chain) and $BENCH_CLIENT_KEY into the new context.
 *
 * wrk reuses one SSL object per connection (SSL_clear on reconnect), which keeps the
 * session: every reconnect is a resumed handshake. With BENCH_FULL_HANDSHAKE=1 the
 * session is dropped before each handshake starts, so every connection does a full one.
 * BENCH_NO_CLIENT_CERT=1 leaves the contexts alone: no client certificate is presented
 * (the handshake-*-nocert workloads; the CMG's CCM_Proxy_ServerAuth path with a token).
 * Built by bench.load at set-up: gcc -shared -fPIC -O2 -o shim.so wrk_clientcert.c -ldl -l:libssl.so.3
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_method_st SSL_METHOD;
typedef struct ssl_st SSL;
typedef struct ssl_session_st SSL_SESSION;
extern int SSL_in_before(const SSL *s);
extern int SSL_set_session(SSL *s, SSL_SESSION *session);
extern int SSL_CTX_use_certificate_chain_file(SSL_CTX *ctx, const char *file);
extern int SSL_CTX_use_PrivateKey_file(SSL_CTX *ctx, const char *file, int type);

SSL_CTX *SSL_CTX_new(const SSL_METHOD *method) {
    static SSL_CTX *(*real)(const SSL_METHOD *) = NULL;
    if (real == NULL) {
        real = (SSL_CTX * (*)(const SSL_METHOD *)) dlsym(RTLD_NEXT, "SSL_CTX_new");
        if (real == NULL) {
            fprintf(stderr, "wrk_clientcert: SSL_CTX_new not found\n");
            abort();
        }
    }
    SSL_CTX *ctx = real(method);
    const char *cert = getenv("BENCH_CLIENT_CERT");
    const char *key = getenv("BENCH_CLIENT_KEY");
    const char *none = getenv("BENCH_NO_CLIENT_CERT");
    if (none != NULL && none[0] == '1') {
        return ctx;
    }
    if (ctx != NULL && cert != NULL && key != NULL) {
        if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1 ||
            SSL_CTX_use_PrivateKey_file(ctx, key, 1 /* SSL_FILETYPE_PEM */) != 1) {
            fprintf(stderr, "wrk_clientcert: cannot load %s / %s\n", cert, key);
            abort();
        }
    }
    return ctx;
}

int SSL_connect(SSL *ssl) {
    static int (*real)(SSL *) = NULL;
    static int full = -1;
    if (real == NULL) {
        real = (int (*)(SSL *)) dlsym(RTLD_NEXT, "SSL_connect");
        if (real == NULL) {
            fprintf(stderr, "wrk_clientcert: SSL_connect not found\n");
            abort();
        }
    }
    if (full < 0) {
        const char *v = getenv("BENCH_FULL_HANDSHAKE");
        full = (v != NULL && v[0] == '1');
    }
    if (full && SSL_in_before(ssl)) {
        SSL_set_session(ssl, NULL);
    }
    return real(ssl);
}
