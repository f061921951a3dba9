;; A stand-in for CircleCI's `admin` namespace in the frontend's REPL, for the
;; cleanup-builds tests against a real clojure.main REPL (Debian's `clojure`).
;;
;;   clojure -i tests/clojure/admin.clj -i SITE.clj -r
;;
;; SITE.clj (written by the test) calls (admin/configure! {...}) with
;;   :log      file: one line per deletion, "deleted <url> read-eval=<*read-eval*>"
;;   :sessions file: one line per REPL session started
;;   :fail     set of URLs whose deletion throws (ex-info "build not found: <url>")
;;   :warn     set of URLs whose deletion prints a warning on stderr first
;; Instead of `-r`, `-e "(admin/repl-in 'admin)"` runs a clojure.main REPL
;; whose prompt is `admin=> `. (Called from SITE.clj instead, the REPL runs
;; inside `load`, which binds *read-eval* for the thread: a REPL where it
;; cannot be turned off.)
;;
;; Like a real console it prints noise: a warning on stdout and one on stderr
;; at load, and progress in several writes for every deletion.
(ns admin
  (:require [clojure.main :as main]))

(def ^:private config (atom {:fail #{} :warn #{}}))

(defn- append! [path line]
  (when path
    (locking config
      (spit path (str line "\n") :append true))))

(defn configure! [m]
  (reset! config (merge {:fail #{} :warn #{}} m))
  (append! (:sessions m) (str "session " (.pid (java.lang.ProcessHandle/current))))
  :configured)

(println "WARNING: admin stand-in for tests: deletions are recorded, nothing is deleted")
(binding [*out* *err*]
  (println "WARNING: abs already refers to: #'clojure.core/abs in namespace: admin (a typical load warning)"))

(defn delete-build
  "Deletes the build at `url` (records it); throws for the configured ones."
  [url]
  (when-not (string? url)
    (throw (IllegalArgumentException. (str "build url must be a string, not " (pr-str url)))))
  (print "deleting" url)
  (flush)
  (when (contains? (:warn @config) url)
    (binding [*out* *err*] (println "WARNING: build" url "has no containers left")))
  (when (contains? (:fail @config) url)
    (println)
    (throw (ex-info (str "build not found: " url) {:url url})))
  (print " ...")
  (flush)
  (append! (:log @config) (str "deleted " url " read-eval=" *read-eval*))
  (println " done")
  true)

(defn repl-in
  "Runs a clojure.main REPL in namespace `ns` (prompt `<ns>=> `) on stdin."
  [ns]
  (println "admin console (clojure.main" (clojure-version) "REPL)")
  (main/repl :init (fn [] (in-ns ns)))
  (System/exit 0))
