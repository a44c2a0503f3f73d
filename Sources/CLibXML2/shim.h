#ifndef STARLING_CLIBXML2_SHIM_H
#define STARLING_CLIBXML2_SHIM_H
// Debian's libxml2 is built with ICU and its headers then pull in the system's ICU headers, which clash
// with the ICU copy inside Foundation. We never touch the encoding handler struct whose layout the
// macro changes (only pointers to it), so hiding it is safe.
#include <libxml/xmlversion.h>
#undef LIBXML_ICU_ENABLED
#include <libxml/parser.h>
#include <libxml/parserInternals.h>
#include <libxml/SAX2.h>
#include <libxml/xmlerror.h>
#include <libxml/dict.h>
#include <libxml/globals.h>

/// The current thread's shared name dictionary and its pool of parser contexts ready for reuse.
typedef struct starling_parser_thread_state {
    xmlDictPtr shared;
    int pooled;
    xmlParserCtxtPtr pool[64];
} starling_parser_thread_state;

static inline starling_parser_thread_state *starling_parser_thread(void) {
    static __thread starling_parser_thread_state state = {NULL, 0, {NULL}};
    return &state;
}

/// A push parser that is cheap to keep per connection: its input buffer starts at 1 KB instead of
/// 8 KB (it grows as needed), and its name dictionary is shared by every parser created on this thread
/// (one per event loop, so libxml2 never sees it from two threads). A fresh shared dictionary is started
/// once the current one holds `dict_limit` bytes, so names a client invents cannot grow it without
/// bound; parsers still using the old one keep it alive by reference count. Without these two, a parser
/// costs about 12 KB; with them about 3 KB.
///
/// Contexts released on this thread are reset and reused rather than created anew: creating one makes
/// a dictionary, and libxml2 takes a process-wide lock for that (its random seed), which every read of
/// every idle session would otherwise contend for.
static inline xmlParserCtxtPtr starling_create_push_parser(xmlSAXHandlerPtr sax, void *user_data, size_t dict_limit) {
    starling_parser_thread_state *thread = starling_parser_thread();
    if (thread->shared != NULL && xmlDictGetUsage(thread->shared) > dict_limit) {
        while (thread->pooled > 0) xmlFreeParserCtxt(thread->pool[--thread->pooled]);
        xmlDictFree(thread->shared);
        thread->shared = NULL;
    }
    if (thread->shared == NULL) thread->shared = xmlDictCreate();
    xmlDefaultBufferSize = 512;
    while (thread->pooled > 0) {
        xmlParserCtxtPtr reused = thread->pool[--thread->pooled];
        if (xmlCtxtResetPush(reused, NULL, 0, NULL, NULL) == 0) {
            reused->userData = user_data;
            return reused;
        }
        xmlFreeParserCtxt(reused);
    }
    xmlParserCtxtPtr ctxt = xmlCreatePushParserCtxt(sax, user_data, NULL, 0, NULL);
    if (ctxt == NULL || thread->shared == NULL) return ctxt;
    xmlDictFree(ctxt->dict);
    ctxt->dict = thread->shared;
    xmlDictReference(thread->shared);
    /* The parser compares these by pointer: they must come from the dictionary it now uses. */
    ctxt->str_xml = xmlDictLookup(thread->shared, BAD_CAST "xml", 3);
    ctxt->str_xmlns = xmlDictLookup(thread->shared, BAD_CAST "xmlns", 5);
    ctxt->str_xml_ns = xmlDictLookup(thread->shared, XML_XML_NAMESPACE, 36);
    return ctxt;
}

/// Gives a context back: kept for reuse when it belongs to this thread's current dictionary (a
/// context freed on another thread, or from a retired dictionary, is freed).
static inline void starling_release_push_parser(xmlParserCtxtPtr ctxt) {
    starling_parser_thread_state *thread = starling_parser_thread();
    if (ctxt->dict == thread->shared && thread->shared != NULL && thread->pooled < 64) {
        thread->pool[thread->pooled++] = ctxt;
        return;
    }
    xmlFreeParserCtxt(ctxt);
}
#endif
